"""Live: a real Prometheus scrapes the real tracer over TLS with basic auth
(issue 27). Debian's `prometheus` server (taken out of its package by scripts/fetch-prometheus), started by the test with a scrape
configuration of its own (https, the test's CA, basic auth; and a second job
without credentials) and the shipped alerting rules
(tracer/system/alerts.yml); the tracer (`trace --metrics --web-config`, real
BPF programs) traces a network namespace the test makes. After the
write-up's collision, Prometheus's HTTP API shows the target up and
`tcpcollide_collisions_total` at 1 with its labels, and the job without
credentials down (401). After a burst of 80 more (scripts/storm.py), the
real server's rule evaluation puts ConnectionsPayingCollisionPenalties
pending (or firing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.live import REPO, SLOW, Tracer, free_port, ns_name, read_steps, require_live, scenario
from tests.test_webconfig import HASH, pki  # noqa: F401 - the certificates fixture
from tracer.host import netns

pytestmark = pytest.mark.live
PROMETHEUS = REPO / ".cache" / "prometheus" / "usr" / "bin" / "prometheus"  # scripts/fetch-prometheus
BURST = 80  # > 60 collisions in the 10 minutes the alert's rate looks at: over 0.1/s


@pytest.fixture(autouse=True)
def _live():
    require_live()
    if not PROMETHEUS.exists():
        pytest.fail(f"no {PROMETHEUS}: scripts/fetch-prometheus (run by scripts/setup --for-tests) takes it "
                    "out of Debian's prometheus package")


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


def wait_for(what, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_prometheus_scrapes_the_tracer_over_tls_with_basic_auth(pki, tmp_path):  # noqa: F811
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                   f"basic_auth_users:\n  prometheus: {HASH}\n")
    port, prom_port = free_port(), free_port()
    target = f'["127.0.0.1:{port}"]'
    (tmp_path / "prometheus.yml").write_text(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{REPO}/tracer/system/alerts.yml"]
scrape_configs:
  - job_name: tcpcollide
    scheme: https
    tls_config: {{ca_file: "{pki}/ca.crt"}}
    basic_auth: {{username: prometheus, password: s3cret}}
    static_configs: [{{targets: {target}}}]
  - job_name: tcpcollide-noauth
    scheme: https
    tls_config: {{ca_file: "{pki}/ca.crt"}}
    static_configs: [{{targets: {target}}}]
""")
    base = f"http://127.0.0.1:{prom_port}"
    with netns.NetNS(ns_name("prom")) as ns:
        tracer = Tracer("--netns", str(ns.inode), "--metrics", f"127.0.0.1:{port}", "--web-config", str(web))
        prom = subprocess.Popen([str(PROMETHEUS), f"--config.file={tmp_path}/prometheus.yml",
                                 f"--storage.tsdb.path={tmp_path}/data", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            tracer.wait_ready()

            def prom_ready():
                try:
                    with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False
            assert wait_for(prom_ready, 60 * SLOW), "prometheus never became ready"
            proc = scenario("--server-ns", ns.name, "--client-ns", ns.name, "--fast", "--hold", "0.2")
            steps = read_steps(proc)
            assert proc.wait(timeout=60 * SLOW) == 0 and steps[-1]["step"] == "connected", steps

            got = wait_for(lambda: [r for r in query(base, 'tcpcollide_collisions_total{job="tcpcollide"}')
                                    if float(r["value"][1]) >= 1], 30 * SLOW)
            assert len(got) == 1 and float(got[0]["value"][1]) == 1, got
            labels = got[0]["metric"]
            assert (labels["server_port"], labels["outcome"], labels["lingering_state"]) == (
                "12345", "recovered", "CLOSE_WAIT"), labels
            def up():
                got = {r["metric"]["job"]: float(r["value"][1]) for r in query(base, "up")}
                return got if len(got) == 2 else None
            assert wait_for(up, 30 * SLOW) == {"tcpcollide": 1.0, "tcpcollide-noauth": 0.0}, query(base, "up")
            with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as r:
                targets = json.load(r)["data"]["activeTargets"]
            refused = next(t for t in targets if t["labels"]["job"] == "tcpcollide-noauth")
            assert "401" in refused["lastError"], refused

            storm = subprocess.run([sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns.name, "--burst",
                                    str(BURST), "--client-port-base", "30000", "--drain", str(30 * SLOW)],
                                   capture_output=True, text=True, timeout=300 * SLOW)
            assert storm.returncode == 0, storm.stderr

            def alert():
                return [r for r in query(base, 'ALERTS{alertname="ConnectionsPayingCollisionPenalties"}')
                        if r["metric"]["alertstate"] in ("pending", "firing")]
            fired = wait_for(alert, 30 * SLOW)
            assert fired and fired[0]["metric"]["server_port"] == "12345", query(base, "ALERTS")
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
            rc, records, err = tracer.stop()
        assert rc == 0, err
