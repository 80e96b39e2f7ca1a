"""Live: the tracer as a systemd service would run it, against sockets bound
by the test where systemd's would be: $NOTIFY_SOCKET (readiness, status,
watchdog) and the journal's native socket (TCPCOLLIDE_JOURNAL_SOCKET). The
real tracer, a real collision (the seed's scenario in a namespace the test
makes)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time

import pytest

from tests.live import BACKEND, BIN, SLOW, STATE_HOOK, bpf_prog_ids, read_steps, require_live, scenario
from tests.test_systemd import parse_entry
from tracer.resources import service_unit

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()


def bound(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(60 * SLOW)
    return s


def test_ready_after_the_hooks_fire_status_watchdog_and_the_journal(ns, tmp_path):
    notify, journal = bound(tmp_path / "notify"), bound(tmp_path / "journal")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000",
           "TCPCOLLIDE_JOURNAL_SOCKET": str(tmp_path / "journal")}
    before = bpf_prog_ids()
    proc = subprocess.Popen([str(BIN), "trace", "--journal", "--backend", BACKEND, "--state-hook", STATE_HOOK,
                             "--netns", str(ns.inode)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        first = notify.recv(4096).decode().split("\n")
        attached = bpf_prog_ids() - before  # when READY=1 came
        ready = parse_entry(journal.recv(1 << 20))
        sc = scenario("--server-ns", ns.name, "--fast")
        steps = read_steps(sc, until="connected")
        assert steps[-1]["step"] == "connected", steps
        entries = []
        while not any(e["TCPCOLLIDE_TYPE"] == "collision" for e in entries):
            entries.append(parse_entry(journal.recv(1 << 20)))
        messages = []
        deadline = time.monotonic() + 15 * SLOW
        while time.monotonic() < deadline and not any(m.startswith("STATUS=") and "1 collision(s)" in m
                                                       for m in messages):
            messages += notify.recv(4096).decode().split("\n")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30 * SLOW)
        messages += notify.recv(4096).decode().split("\n")
        while True:
            entries.append(parse_entry(journal.recv(1 << 20)))
            if entries[-1]["TCPCOLLIDE_TYPE"] == "summary":
                break
        sc.wait(timeout=30 * SLOW)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert rc == 0 and stderr == "", stderr
    assert proc.stdout.read() == "", "records went to stdout, not the journal"
    # READY=1 only once every hook was attached and had fired (the self-test is before ready)
    assert "READY=1" in first and len(attached) >= 5, (first, attached)
    assert ready["TCPCOLLIDE_TYPE"] == "ready" and json.loads(ready["TCPCOLLIDE_JSON"])["type"] == "ready"
    assert any(m.startswith("STATUS=tracing (") for m in first)
    # kept current, and the watchdog fed at half of WATCHDOG_USEC
    assert any(m.startswith("STATUS=") and "1 collision(s) reported" in m for m in messages), messages
    assert "WATCHDOG=1" in messages and "STOPPING=1" in messages, messages
    # the collision, as a journal entry a query can select on
    [col] = [e for e in entries if e["TCPCOLLIDE_TYPE"] == "collision"]
    rec = json.loads(col["TCPCOLLIDE_JSON"])
    assert rec["type"] == "collision" and col["TCPCOLLIDE_OUTCOME"] == rec["outcome"] == "recovered"
    assert col["TCPCOLLIDE_SERVER"] == rec["server"] and col["TCPCOLLIDE_CLIENT"] == rec["client"]
    assert col["PRIORITY"] == "4" and col["SYSLOG_IDENTIFIER"] == "tcpcollide-trace"
    assert col["MESSAGE"].startswith(f"collision: {rec['client']} -> {rec['server']}")
    assert entries[-1]["TCPCOLLIDE_TYPE"] == "summary"


SET = "-all,+sys_admin,+net_admin,+sys_ptrace,+dac_read_search,+bpf,+perfmon"  # the unit's bounding set


def unit_limits() -> None:
    """The unit's resource limits (LimitMEMLOCK=: before 5.11 BPF maps count against it), set as
    systemd sets them, before the capabilities are dropped (a preexec_fn)."""
    line = next(x for x in service_unit().read_text().splitlines() if x.startswith("LimitMEMLOCK="))
    value = line.split("=", 1)[1]
    limit = resource.RLIM_INFINITY if value == "infinity" else int(value)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    except (ValueError, OSError):
        pass  # no CAP_SYS_RESOURCE here (this project's machines; their kernel charges the memory cgroup instead)


def capped(bounding: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    """The tracer as root with only these capabilities (setpriv --bounding-set, as CapabilityBoundingSet= does)
    and the unit's resource limits."""
    return subprocess.run(["setpriv", f"--bounding-set={bounding}", "--", str(BIN), *argv], capture_output=True,
                          text=True, timeout=120 * SLOW, preexec_fn=unit_limits, **kw)


def capped_collision(ns, bounding: str, *scenario_args: str) -> dict:
    """The tracer, capped to `bounding`, through one collision of the scenario (in `ns`): its report."""
    proc = subprocess.Popen(["setpriv", f"--bounding-set={bounding}", "--", str(BIN), "trace", "--json", "--backend",
                             BACKEND, "--netns", str(ns.inode), "-c", "1", "--duration", str(60 * SLOW)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=unit_limits)
    try:
        ready = json.loads(proc.stdout.readline())
        sc = scenario("--server-ns", ns.name, "--fast", *scenario_args)
        read_steps(sc, until="connected")
        out, err = proc.communicate(timeout=60 * SLOW)
        sc.wait(timeout=30 * SLOW)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ready["type"] == "ready" and proc.returncode == 0, err
    [rec] = [json.loads(x) for x in out.splitlines() if '"type":"collision"' in x]
    return rec


@pytest.mark.capabilities
def test_with_exactly_the_units_capabilities_the_tracer_sees_the_collision(ns):
    rec = capped_collision(ns, SET)
    assert rec["outcome"] == "recovered" and not rec["incomplete"]


@pytest.mark.capabilities
@pytest.mark.parametrize("dropped, fatal", [("net_admin", True), ("sys_admin", True), ("sys_ptrace", False),
                                            ("dac_read_search", False)])
def test_each_capability_dropped_fails_or_degrades_as_doctor_says(dropped, fatal):
    bounding = SET.replace(f",+{dropped}", "")
    doctor = capped(bounding, "doctor", "--json")
    rep = json.loads(doctor.stdout)
    named = [m for m in rep["capabilities"]["missing"] if m["capability"] == f"CAP_{dropped.upper()}"]
    assert named and named[0]["fatal"] is fatal, rep["capabilities"]
    trace = capped(bounding, "trace", "--json", "--backend", BACKEND, "--duration", "1")
    if fatal:
        assert doctor.returncode == 1 and not rep["ok"]
        assert trace.returncode == 1 and len(trace.stderr.splitlines()) == 1 and "Traceback" not in trace.stderr
    else:
        assert doctor.returncode == 0 and rep["ok"]
        assert trace.returncode == 0 and json.loads(trace.stdout.splitlines()[0])["type"] == "ready", trace.stderr


@pytest.mark.capabilities
@pytest.mark.parametrize("bounding, named", [(SET, True), ("-all,+sys_admin,+net_admin", False)])
def test_without_ptrace_and_dac_read_search_another_users_process_is_not_named_and_says_why(ns, bounding, named):
    """The leaking server runs as nobody (uid 65534). With the unit's whole
    set the tracer names it; without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH
    it cannot read that process's descriptors and says so (`not_readable`),
    as doctor warned, instead of claiming nobody held the socket."""
    rec = capped_collision(ns, bounding, "--accept", "--server-user", "65534", "--server-comm", "nobodysrv",
                           "--hold", str(3 * SLOW))
    owners = rec["closewait_socket"]["owners"]
    if named:
        assert [o["comm"] for o in owners] == ["nobodysrv"], rec["closewait_socket"]
    else:
        assert owners == [] and rec["closewait_socket"]["owners_unknown"] == "not_readable", rec["closewait_socket"]
        assert "CAP_SYS_PTRACE" in rec["explanation"]
