"""Prometheus metrics for fleets (`--metrics HOST:PORT`), with the official
prometheus_client, on a registry of the tracer's own.

Counters and the penalty histogram move as collisions are reported. The
CLOSE_WAIT sockets and the ghosts per listener are gauges computed when
Prometheus scrapes, from the same snapshot `tcpcollide-trace inventory`
prints (sock_diag and /proc, cached a few seconds so a scrape storm costs
little). Label values (process names) are escaped by prometheus_client.
"""

from __future__ import annotations

import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tracer.host import inventory
from tracer.pipeline.records import culprit_workload

# The HTTP server: a thread per connection (prometheus_client's own design),
# but at most MAX_CONNECTIONS at once (more are closed as soon as accepted:
# a client holding hundreds open would otherwise take the tracer's file
# descriptors, which its /proc scans and sock_diag need), each given
# REQUEST_TIMEOUT_S per read or write (a connection held open without
# sending is closed then), and no word on stderr about a client's garbage or
# its going away mid-request (counted: tcpcollide_metrics_requests_failed_total).
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_S = 5.0
PENALTY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.5, 7.0, 15.0, 30.0)
SNAPSHOT_TTL_S = 5.0


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (host, port); ValueError when not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class SocketCollector:
    """Gauges from an inventory snapshot, taken at scrape time."""

    def __init__(self, snapshot=inventory.snapshot):
        self._snapshot = snapshot
        self._cached: tuple[float, dict] | None = None

    def invalidate(self) -> None:
        """Something changed (a collision): the next scrape takes a new snapshot."""
        self._cached = None

    def _inventory(self) -> dict | None:
        if self._cached is None or time.monotonic() - self._cached[0] > SNAPSHOT_TTL_S:
            try:
                self._cached = (time.monotonic(), self._snapshot())
            except Exception:  # noqa: BLE001 - a failed snapshot must not break the scrape
                return None
        return self._cached[1]

    def collect(self):
        inv = self._inventory()
        cw = GaugeMetricFamily("tcpcollide_closewait_sockets",
                               "CLOSE_WAIT sockets by holding process and local address", labels=[
                                   "netns", "local", "pid", "comm"])
        oldest = GaugeMetricFamily("tcpcollide_closewait_oldest_age_seconds",
                                   "Age of the oldest CLOSE_WAIT socket of the group (since its last ACK)",
                                   labels=["netns", "local", "pid", "comm"])
        queued = GaugeMetricFamily("tcpcollide_listener_queue_length",
                                   "Accept-queue length (Recv-Q) of listeners with ghosts or a full queue",
                                   labels=["netns", "listener"])
        ghosts = GaugeMetricFamily("tcpcollide_listener_ghosts",
                                   "Dead children (reset, never accepted) still counted in the accept queue",
                                   labels=["netns", "listener"])
        for g in (inv or {}).get("closewait", []):
            labels = [str(g["netns"]), g["local"], "" if g["pid"] is None else str(g["pid"]), g["comm"]]
            cw.add_metric(labels, g["count"])
            if g["oldest_age_s"] is not None:
                oldest.add_metric(labels, g["oldest_age_s"])
        for q in (inv or {}).get("listeners", []):
            labels = [str(q["netns"]), q["listener"]]
            queued.add_metric(labels, q["recv_q"])
            ghosts.add_metric(labels, q["ghosts"])
        return [cw, oldest, queued, ghosts]


class KernelCollector:
    """The kernel's own counts (tracer/kernel/counters.py), as of the
    tracer's last look (once a second): collisions and challenged SYNs by
    server port and lingering state, whatever user space kept up with, and
    what the kernel could not pass on."""

    def __init__(self):
        self.counts: dict | None = None

    def collect(self):
        collisions = CounterMetricFamily("tcpcollide_kernel_collisions", "Collisions the kernel counted (past the "
                                         "filters), by server port and lingering state, reported or not",
                                         labels=["server_port", "lingering_state"])
        syns = CounterMetricFamily("tcpcollide_kernel_syn_hits", "SYNs challenged by a lingering socket, "
                                   "counted in the kernel", labels=["server_port", "lingering_state"])
        refused = CounterMetricFamily("tcpcollide_events_not_submitted", "Events the perf buffer refused "
                                      "(counted in the kernel)")
        untracked = CounterMetricFamily("tcpcollide_kernel_untracked", "Collisions the kernel could not track "
                                        "(their later events were not streamed)")
        evicted = CounterMetricFamily("tcpcollide_kernel_tracked_evicted", "Collisions in progress whose kernel-side "
                                      "tracking (map tracked, full) was evicted: their later events were not streamed")
        by: dict[tuple[str, str], list[int]] = {}
        if self.counts is not None:
            for row in self.counts["by_server"]:
                pair = by.setdefault((str(row["server_port"]), row["lingering_state"]), [0, 0])
                pair[0] += row["collisions"]
                pair[1] += row["syn_hits"]
            refused.add_metric([], self.counts["events_not_submitted"])
            untracked.add_metric([], self.counts["untracked"])
            evicted.add_metric([], self.counts.get("tracked_evicted", 0))
        for labels, (c, s) in sorted(by.items()):
            collisions.add_metric(list(labels), c)
            syns.add_metric(list(labels), s)
        yield from (collisions, syns, refused, untracked, evicted)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # per read/write on the connection (StreamRequestHandler.setup)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """No log line per request."""


class Server(ThreadingMixIn, WSGIServer):
    """The metrics' HTTP server: bounded connections, silent about bad clients."""

    daemon_threads = True
    refused = 0  # connections closed at once: MAX_CONNECTIONS were open
    failed = 0  # requests that ended in an error: garbage, a timeout, a client gone mid-request

    def server_bind(self):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_bind()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread, which releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        self.failed += 1

    web = None  # tracer/output/webconfig.py WebConfig: TLS, basic auth (--web-config)

    def finish_request(self, request, client_address):
        """With TLS, the handshake in the connection's own thread (a client
        that never finishes it holds one slot, for REQUEST_TIMEOUT_S), then
        the client certificate's names (client_allowed_sans)."""
        policy = self.web.current() if self.web is not None else None
        if policy is None or policy.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_S)
        try:
            tls = policy.tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError):  # no TLS spoken, a certificate refused, a timeout
            self.failed += 1
            return
        try:
            if not self.web.peer_allowed(policy, tls.getpeercert()):
                self.failed += 1
                return
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class ServerCollector:
    """What the metrics' own server turned away."""

    def __init__(self):
        self.server: Server | None = None

    def collect(self):
        refused = CounterMetricFamily("tcpcollide_metrics_connections_refused", "Connections to the metrics port "
                                      f"closed at once because {MAX_CONNECTIONS} were open")
        failed = CounterMetricFamily("tcpcollide_metrics_requests_failed", "Requests to the metrics port that "
                                     "failed: not HTTP, too large, no request within "
                                     f"{REQUEST_TIMEOUT_S:g} s, or the client gone mid-request")
        if self.server is not None:
            refused.add_metric([], self.server.refused)
            failed.add_metric([], self.server.failed)
        yield from (refused, failed)


def serve(host: str, port: int, registry: CollectorRegistry, web=None) -> tuple[Server, threading.Thread]:
    """Serve `registry` on host:port from a daemon thread (`web`: the
    --web-config's WebConfig, or None: plain HTTP, no authentication)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class _Server(Server):
        address_family = family

    app = make_wsgi_app(registry)
    httpd = make_server(host, port, web.wsgi(app) if web is not None else app, _Server, handler_class=_Handler)
    httpd.web = web
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return httpd, thread


class Metrics:
    def __init__(self, listen: str, snapshot=inventory.snapshot, web=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.collisions = Counter("tcpcollide_collisions", "Collisions reported, by server port and outcome",
                                  ["server_port", "outcome", "outcome_detail", "lingering_state"], registry=r)
        self.by_workload = Counter("tcpcollide_collisions_by_workload", "Collisions reported, by the culprit's "
                                   "workload: namespace/pod, container name, or systemd unit (empty: not known)",
                                   ["workload"], registry=r)
        self.penalty = Histogram("tcpcollide_penalty_seconds", "Delay a colliding client paid: first SYN to "
                                 "established", buckets=PENALTY_BUCKETS, registry=r)
        self.translated = Counter("tcpcollide_translated_collisions", "Collisions reported through an address "
                                  "translation (NAT), by kind: snat, dnat, snat+dnat", ["kind"], registry=r)
        self.translation_skipped = Counter("tcpcollide_translation_lookups_skipped", "Collisions whose translation "
                                           "was not looked for in conntrack (the lookups' budget was spent, or "
                                           "ctnetlink could not be asked)", registry=r)
        self.events = Counter("tcpcollide_events", "Kernel events received", registry=r)
        self.lost = Counter("tcpcollide_lost_events", "Kernel events lost (perf buffer full)", registry=r)
        self.skipped = Counter("tcpcollide_skipped_runs", "Runs of the tracer's BPF programs the kernel skipped "
                               "(recursion_misses: each may have been an event)", registry=r)
        self.hook_up = Gauge("tcpcollide_hook_up", "1 when a logical hook has a kernel hook attached",
                             ["logical", "backend", "target"], registry=r)
        self.hook_verified = Gauge("tcpcollide_hook_verified", "1 when the self-test saw the hook fire",
                                   ["logical"], registry=r)
        self.storms = Counter("tcpcollide_storm_records", "storm records written: a second in which events or "
                              "collisions were lost", registry=r)
        self.kernel_counts = KernelCollector()
        r.register(self.kernel_counts)
        self.sockets = SocketCollector(snapshot)
        r.register(self.sockets)
        served = ServerCollector()
        r.register(served)
        host, port = parse_listen(listen)
        try:
            self.server, self.thread = serve(host, port, r, web)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {listen}: {e.strerror}") from None
        served.server = self.server

    def ready(self, hooks: list[dict]) -> None:
        for h in hooks:
            self.hook_up.labels(h["logical"], h["backend"] or "", h["target"] or "").set(1 if h["available"] else 0)
            if h["verified"] is not None:
                self.hook_verified.labels(h["logical"]).set(1 if h["verified"] else 0)

    def collision(self, rec: dict) -> None:
        port = rec["server"].rpartition(":")[2]
        self.collisions.labels(port, rec["outcome"], rec.get("outcome_detail") or "",
                               rec["lingering_state"] or "unknown").inc()
        self.by_workload.labels(culprit_workload(rec) or "").inc()
        if rec.get("translation"):
            self.translated.labels(rec["translation"]["kind"] or "").inc()
        if rec.get("translation_unknown"):
            self.translation_skipped.inc()
        if rec["penalty_ms"] is not None:
            self.penalty.observe(rec["penalty_ms"] / 1000)
        self.sockets.invalidate()

    def kernel(self, counts: dict) -> None:
        self.kernel_counts.counts = counts

    def storm(self) -> None:
        self.storms.inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
