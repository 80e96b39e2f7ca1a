"""The metrics server behind --web-config (tracer/output/webconfig.py): the
exporter-toolkit file format read strictly, and the real server
(tracer/output/metrics.py, on a port of the test's own) over real TLS with
certificates the test makes with openssl: basic auth with bcrypt hashes
(401 without or with a wrong password), mutual TLS (a client without a
certificate, or with one the CA did not sign, gets nothing), the allowed
SANs, plain HTTP on the TLS port, the configured headers, the rate limit,
a certificate renewed on disk, and the command line's one-line errors. No
BPF: the server is started without a tracer."""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.live import BIN, REPO, free_port
from tracer.output import webconfig
from tracer.output.metrics import Metrics
from tracer.output.webconfig import WebConfig, WebConfigError

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)  # as htpasswd -B


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate for
    prometheus.test signed by the CA, and one self-signed."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=d)
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:prometheus.test"), ("other", "DNS:other.test")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            "rogue.key", "-out", "rogue.crt", "-days", "2", "-subj", "/CN=rogue",
            "-addext", "subjectAltName=DNS:prometheus.test", cwd=d)
    return d


def serve(pki: Path, text: str) -> tuple[Metrics, int, Path]:
    path = pki / f"web-{time.monotonic_ns()}.yml"
    path.write_text(text)
    port = free_port()
    m = Metrics(f"127.0.0.1:{port}", snapshot=lambda: {"closewait": [], "listeners": []}, web=WebConfig(str(path)))
    return m, port, path


def client_ctx(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def get(url: str, ctx: ssl.SSLContext | None = None, user: str | None = None, password: str | None = None):
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


TLS = """tls_server_config:
  cert_file: server.crt
  key_file: server.key
"""


def test_tls_and_basic_auth(pki):
    m, port, _ = serve(pki, TLS + f"basic_auth_users:\n  prometheus: {HASH}\n"
                                  "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        status, headers, body = get(url, client_ctx(pki), "prometheus", "s3cret")
        assert status == 200 and "tcpcollide_collisions" in body and headers["X-Content-Type-Options"] == "nosniff"
        status, headers, _ = get(url, client_ctx(pki), "prometheus", "wrong")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get(url, client_ctx(pki))[0] == 401
        assert get(url, client_ctx(pki), "nobody", "s3cret")[0] == 401
        # plain HTTP on the TLS port: no metrics, no HTTP answer at all
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        conn.close()
        # the certificate is the one configured, for the address served
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        m.close()


def test_mutual_tls_and_allowed_sans(pki):
    m, port, _ = serve(pki, TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
                                  "  client_allowed_sans: [prometheus.test]\n")
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        assert get(url, client_ctx(pki, "client"))[0] == 200
        for cert in (None, "rogue", "other"):  # no certificate, not the CA's, not an allowed name
            with pytest.raises((urllib.error.URLError, ssl.SSLError, OSError, http.client.HTTPException)):
                get(url, client_ctx(pki, cert))
    finally:
        m.close()


def test_a_renewed_certificate_is_served_and_a_broken_file_keeps_the_last(pki, capsys):
    d = pki / "renew"
    d.mkdir(exist_ok=True)
    for name in ("server.crt", "server.key"):
        shutil.copy(pki / name, d / name)
    shutil.copy(pki / "ca.crt", d / "ca.crt")
    m, port, path = serve(d, TLS + f"basic_auth_users:\n  prometheus: {HASH}\n")
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        assert get(url, client_ctx(pki), "prometheus", "s3cret")[0] == 200
        path.write_text(TLS + "basic_auth_users: [not, a, mapping]\n")
        time.sleep(webconfig.RECHECK_S + 0.2)
        assert get(url, client_ctx(pki), "prometheus", "s3cret")[0] == 200  # the last good one
        assert "keeps the last one that loaded" in capsys.readouterr().err
        path.write_text(TLS)  # no users any more
        time.sleep(webconfig.RECHECK_S + 0.2)
        assert get(url, client_ctx(pki))[0] == 200
    finally:
        m.close()


def test_rate_limit(pki):
    m, port, _ = serve(pki, "rate_limit:\n  interval: 10s\n  burst: 2\n")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert [get(url)[0] for _ in range(3)] == [200, 200, 429]
    finally:
        m.close()


@pytest.mark.parametrize("text,error", [
    ("- a list\n", "not a mapping"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key}\nbasic_auth: {}\n", "unknown field 'basic_auth'"),
    ("tls_server_config: {cert_file: nowhere.crt, key_file: server.key}\n", "nowhere.crt"),
    ("tls_server_config: {cert_file: server.crt}\n", "a certificate and its key are required"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key, min_version: TLS14}\n", "TLS14"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key, client_auth_type: RequireAnyClientCert}\n",
     "not supported"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key, client_auth_type: "
     "RequireAndVerifyClientCert}\n", "needs client_ca_file"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key, cipher_suites: [TLS_FOO]}\n", "TLS_FOO"),
    ("tls_server_config: {cert_file: server.crt, key_file: server.key, curve_preferences: [X25519, CurveP256]}\n",
     "one curve"),
    ("basic_auth_users: {prometheus: plaintext}\n", "not a bcrypt hash"),
    ("rate_limit: {interval: soon}\n", "not a duration"),
    ("http_server_config: {headers: {X-Powered-By: me}}\n", "unknown field 'X-Powered-By'"),
    ("tls_server_config: {cert_file: server.crt\n", "not YAML"),
])
def test_malformed_files_are_one_line_errors(pki, text, error):
    path = pki / "bad.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError) as e:
        webconfig.load(str(path))
    assert error in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_refuses_a_bad_file_before_starting(pki):
    bad = pki / "bad-cli.yml"
    bad.write_text("basic_auth_users: {prometheus: plaintext}\n")
    r = subprocess.run([str(BIN), "trace", "--metrics", "127.0.0.1:1", "--web-config", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "not a bcrypt hash" in r.stderr and "Traceback" not in r.stderr
    good = pki / "good-cli.yml"
    good.write_text(f"basic_auth_users:\n  prometheus: {HASH}\n")
    r = subprocess.run([str(BIN), "trace", "--web-config", str(good)], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 2 and "give --metrics" in r.stderr and "Traceback" not in r.stderr
