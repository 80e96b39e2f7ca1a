"""The metrics server's web configuration (`--web-config FILE`), in the
format of Prometheus's exporter-toolkit (docs/web-configuration.md there),
the one node_exporter and the official exporters read:

    tls_server_config:
      cert_file: server.crt          # or cert: <PEM>
      key_file: server.key           # or key: <PEM>
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt         # or client_ca: <PEM>
      client_allowed_sans: [prometheus.example]
      min_version: TLS12
      max_version: TLS13
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
      prefer_server_cipher_suites: true
      curve_preferences: [X25519]
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt
    rate_limit: {interval: 1s, burst: 10}

Relative paths are relative to the file's directory, as there. Unknown keys
and values are errors (the toolkit reads the file strictly). Where Python's
TLS cannot do what a value asks, it is an error too, never a silent
approximation: `RequestClientCert` and `RequireAnyClientCert` (asking for a
certificate without verifying it), several `curve_preferences`. HTTP/2 is not
served (`http2` is accepted and ignored: Prometheus scrapes over HTTP/1.1 as
well). The file and the files it names are read again when they change
(checked at most once a second: a renewed certificate is used from the next
connection); a change that does not load keeps the last good configuration,
said once on stderr.

Debian's packages only: python3-yaml, python3-bcrypt and the standard ssl.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
TLS_KEYS = {"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
            "client_allowed_sans", "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites",
            "curve_preferences"}
HTTP_KEYS = {"http2", "headers"}
HEADERS = {"Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "X-XSS-Protection",
           "Strict-Transport-Security"}
VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
            "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
UNSUPPORTED_AUTH = {"RequestClientCert", "RequireAnyClientCert"}
# Go's names (crypto/tls) of the TLS 1.2 suites it offers, as OpenSSL names them
CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
CURVES = {"X25519": "X25519", "CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1"}
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")
RECHECK_S = 1.0
AUTH_CACHE = 64  # credentials verified recently (a bcrypt check takes tens of milliseconds)


class WebConfigError(Exception):
    """The file is unreadable or malformed: one line, said at start."""


@dataclass
class Policy:
    """What a loaded file asks of the metrics server."""

    tls: ssl.SSLContext | None = None
    allowed_sans: tuple[str, ...] = ()
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_interval_s: float = 0.0
    rate_burst: int = 0


def _strict(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise WebConfigError(f"{where}: unknown field {unknown[0]!r}")


def _path(base: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(base, name)


def _duration(text) -> float:
    m = DURATION.match(str(text).strip())
    if not m or not any(m.groups()):
        raise WebConfigError(f"rate_limit.interval: {text!r} is not a duration (1s, 500ms, 1m)")
    h, mi, s, ms = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def _tls(cfg: dict, base: str) -> tuple[ssl.SSLContext, tuple[str, ...]]:
    _strict(cfg, TLS_KEYS, "tls_server_config")
    for inline, name in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if cfg.get(inline) and cfg.get(name):
            raise WebConfigError(f"tls_server_config: both {inline} and {name} given")
    if not (cfg.get("cert") or cfg.get("cert_file")) or not (cfg.get("key") or cfg.get("key_file")):
        raise WebConfigError("tls_server_config: a certificate and its key are required (cert_file, key_file)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = VERSIONS[cfg.get("min_version", "TLS12")]
        ctx.maximum_version = VERSIONS[cfg.get("max_version", "TLS13")]
    except KeyError as e:
        raise WebConfigError(f"tls_server_config: unknown TLS version {e.args[0]!r} (TLS10 ... TLS13)") from None
    _load_chain(ctx, cfg, base)
    auth = cfg.get("client_auth_type", "NoClientCert")
    if auth in UNSUPPORTED_AUTH:
        raise WebConfigError(f"tls_server_config: client_auth_type {auth} (a certificate asked for and not "
                             "verified) is not supported: use RequireAndVerifyClientCert")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config: unknown client_auth_type {auth!r}")
    ca = cfg.get("client_ca") or cfg.get("client_ca_file")
    if auth != "NoClientCert" and not ca:
        raise WebConfigError(f"tls_server_config: client_auth_type {auth} needs client_ca_file")
    try:
        if cfg.get("client_ca"):
            ctx.load_verify_locations(cadata=cfg["client_ca"])
        elif ca:
            ctx.load_verify_locations(cafile=_path(base, ca))
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"tls_server_config: client CA: {getattr(e, 'strerror', None) or e}") from None
    ctx.verify_mode = CLIENT_AUTH[auth]
    sans = tuple(str(s) for s in cfg.get("client_allowed_sans") or ())
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError("tls_server_config: client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")
    suites = cfg.get("cipher_suites") or []
    if suites:
        unknown = [s for s in suites if s not in CIPHERS]
        if unknown:
            raise WebConfigError(f"tls_server_config: unknown or unsupported cipher suite {unknown[0]!r}")
        ctx.set_ciphers(":".join(CIPHERS[s] for s in suites))
    if cfg.get("prefer_server_cipher_suites", True):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = cfg.get("curve_preferences") or []
    if len(curves) > 1:
        raise WebConfigError("tls_server_config: curve_preferences: Python's TLS sets one curve; give one")
    if curves:
        if curves[0] not in CURVES:
            raise WebConfigError(f"tls_server_config: unknown curve {curves[0]!r}")
        ctx.set_ecdh_curve(CURVES[curves[0]])
    return ctx, sans


def _load_chain(ctx: ssl.SSLContext, cfg: dict, base: str) -> None:
    tmp = None
    try:
        if cfg.get("cert") or cfg.get("key"):  # inline PEM: ssl loads chains from files only
            tmp = tempfile.mkdtemp(prefix="tcpcollide-tls-")
            for inline, fname in (("cert", "cert_file"), ("key", "key_file")):
                if cfg.get(inline):
                    path = os.path.join(tmp, inline)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(cfg[inline])
                    cfg = {**cfg, fname: path}
        cert, key = _path(base, cfg["cert_file"]), _path(base, cfg["key_file"])
        for path in (cert, key):
            with open(path, "rb"):  # an unreadable one named (load_cert_chain does not say which)
                pass
        ctx.load_cert_chain(cert, key)
    except OSError as e:
        raise WebConfigError(f"tls_server_config: {e.filename or 'certificate'}: {e.strerror or e}") from None
    except ssl.SSLError as e:
        raise WebConfigError(f"tls_server_config: the certificate or key does not load: {e.reason or e}") from None
    finally:
        if tmp:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)


def _files(cfg: dict, base: str) -> list[str]:
    tls = cfg.get("tls_server_config") or {}
    return [_path(base, tls[k]) for k in ("cert_file", "key_file", "client_ca_file") if tls.get(k)]


def parse(text: str, base: str) -> tuple[Policy, list[str]]:
    """A file's text -> (its policy, the files it names)."""
    import yaml  # noqa: PLC0415 - only with --web-config

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebConfigError(f"not YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise WebConfigError("not a mapping of the web configuration's fields")
    _strict(cfg, TOP_KEYS, "web configuration")
    policy = Policy()
    if cfg.get("tls_server_config"):
        if not isinstance(cfg["tls_server_config"], dict):
            raise WebConfigError("tls_server_config: not a mapping")
        policy.tls, policy.allowed_sans = _tls(cfg["tls_server_config"], base)
    http = cfg.get("http_server_config") or {}
    if not isinstance(http, dict):
        raise WebConfigError("http_server_config: not a mapping")
    _strict(http, HTTP_KEYS, "http_server_config")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError("http_server_config.headers: not a mapping")
    _strict(headers, HEADERS, "http_server_config.headers")
    policy.headers = tuple((k, str(v)) for k, v in headers.items() if v)
    users = cfg.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError("basic_auth_users: not a mapping of user: bcrypt hash")
    for user, hashed in users.items():
        h = str(hashed).encode()
        if not re.match(rb"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$", h):
            raise WebConfigError(f"basic_auth_users: the hash of {str(user)!r} is not a bcrypt hash")
        policy.users[str(user)] = h
    rate = cfg.get("rate_limit") or {}
    if not isinstance(rate, dict):
        raise WebConfigError("rate_limit: not a mapping")
    _strict(rate, {"interval", "burst"}, "rate_limit")
    if rate.get("interval") not in (None, 0, "0", "0s"):
        policy.rate_interval_s = _duration(rate["interval"])
        policy.rate_burst = int(rate.get("burst") or 1)
    return policy, _files(cfg, base)


def load(path: str) -> tuple[Policy, list[str]]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise WebConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"{path} is not text") from None
    try:
        return parse(text, os.path.dirname(os.path.abspath(path)))
    except WebConfigError as e:
        raise WebConfigError(f"web configuration {path}: {e}") from None


class WebConfig:
    """A loaded --web-config file, read again when it (or a file it names)
    changes; `policy` is the last one that loaded."""

    def __init__(self, path: str):
        self.path = path
        self.policy, self._files = load(path)
        self._stamps = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._auth_ok: dict[bytes, float] = {}
        self._tokens = float(self.policy.rate_burst)
        self._refilled = time.monotonic()
        self.reload_failed: str | None = None

    def _stat(self) -> tuple:
        out = []
        for p in [self.path, *self._files]:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((p, None))
        return tuple(out)

    def current(self) -> Policy:
        """The policy now (read again if the files changed since the last look)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RECHECK_S:
                return self.policy
            self._checked = now
            stamps = self._stat()
            if stamps == self._stamps:
                return self.policy
            self._stamps = stamps
            try:
                self.policy, self._files = load(self.path)
                self._stamps = self._stat()
                self._auth_ok.clear()
                self.reload_failed = None
            except WebConfigError as e:
                if str(e) != self.reload_failed:
                    sys.stderr.write(f"tcpcollide-trace: warning: {e}; the metrics server keeps the last one "
                                     "that loaded\n")
                self.reload_failed = str(e)
            return self.policy

    def authorized(self, policy: Policy, header: str | None) -> bool:
        """Basic auth against the bcrypt hashes (true when none are configured)."""
        if not policy.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if key in self._auth_ok:
                return True
        import bcrypt  # noqa: PLC0415 - only with basic_auth_users

        hashed = policy.users.get(user)
        # an unknown user costs a bcrypt check too: the time does not tell which users exist
        check = hashed or b"$2b$10$" + b"." * 53
        ok = bcrypt.checkpw(password.encode(), check.replace(b"$2y$", b"$2b$", 1)) and hashed is not None
        if ok:
            with self._lock:
                if len(self._auth_ok) >= AUTH_CACHE:
                    self._auth_ok.pop(next(iter(self._auth_ok)))
                self._auth_ok[key] = time.monotonic()
        return ok

    def allow_rate(self, policy: Policy) -> bool:
        """The token bucket of rate_limit (true when it is off)."""
        if not policy.rate_interval_s:
            return True
        with self._lock:
            now = time.monotonic()
            self._tokens = min(policy.rate_burst, self._tokens + (now - self._refilled) / policy.rate_interval_s)
            self._refilled = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def wsgi(self, app):
        """`app` behind basic auth, the rate limit and the configured headers."""
        def wrapped(environ, start_response):
            policy = self.current()
            headers = list(policy.headers)
            if not self.allow_rate(policy):
                start_response("429 Too Many Requests", [("Content-Type", "text/plain"), *headers])
                return [b"Too Many Requests\n"]
            if not self.authorized(policy, environ.get("HTTP_AUTHORIZATION")):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                    ("WWW-Authenticate", 'Basic realm="tcpcollide-trace"'),
                                                    *headers])
                return [b"Unauthorized\n"]

            def start(status, response_headers, exc_info=None):
                return start_response(status, [*response_headers, *headers], exc_info)
            return app(environ, start)
        return wrapped

    def peer_allowed(self, policy: Policy, cert: dict | None) -> bool:
        """client_allowed_sans: the verified client certificate names one of them."""
        if not policy.allowed_sans:
            return True
        names = {value for _, value in (cert or {}).get("subjectAltName", ())}
        return any(hmac.compare_digest(s, n) for s in policy.allowed_sans for n in names)
