"""What the host says about an incident, beyond the kernel events: the
process holding the lingering socket (/proc) and the listener's accept queue
(sock_diag). The only I/O between the correlator and the report; replays of
a recording have no host to ask and go without it."""

from __future__ import annotations

import ipaddress
import time

from tracer.host import conntrack, inventory, sockdiag
from tracer.pipeline.correlator import Incident
from tracer.pipeline.events import Event
from tracer.pipeline.records import named_processes
from tracer.host.procfs import Owner, OwnerCache
from tracer.host.workload import Workloads

LISTEN = sockdiag.STATE_BITS["LISTEN"]
QUEUE_STATES = LISTEN | sockdiag.STATE_BITS["ESTABLISHED"] | sockdiag.STATE_BITS["CLOSE_WAIT"]


def _addr_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def queue_for(queues: list[dict], server: str) -> dict | None:
    """The listener serving `server` ("IP:PORT"): bound to that address (or its
    IPv4-mapped form), else a wildcard one."""
    addr, port = _addr_port(server)
    ip = ipaddress.ip_address(addr)
    forms = {str(ip)} | ({f"::ffff:{ip}"} if ip.version == 4 else set())
    best = None
    for q in queues:
        qaddr, qport = _addr_port(q["listener"])
        if qport != port:
            continue
        if qaddr in forms:
            return q
        qip = ipaddress.ip_address(qaddr)
        if qip.is_unspecified and (qip.version == ip.version or qip.version == 6) and best is None:
            best = q
    return best


MAX_WATCHED = 256  # listeners with ghosts followed at once
# The longest an ended incident's report waits for the /proc scan that names
# its sockets' owners (scans are spaced out in a storm: OwnerCache).
OWNER_WAIT_S = 3.0
# A listener's queue asked for serves the incidents on it that end within this
# long (a storm ends hundreds a second on one listener: one dump for them all).
QUEUE_FRESH_S = 0.1
WATCH_INTERVAL_S = 1.0


class Diagnoser:
    def __init__(self, owners: OwnerCache | None = None, workloads: Workloads | None = None):
        self.owners = owners or OwnerCache()
        self.workloads = workloads or Workloads()
        self._ns_paths: dict[int, str] = {}
        self._ns_scanned = float("-inf")
        # (netns, listener) -> what was last reported about its queue
        self.watched: dict[tuple[int, str], dict] = {}
        self._polled = float("-inf")
        self.pool = sockdiag.Pool()  # sock_diag sockets by namespace, closed when idle
        # listener queues asked for lately: (netns, listener) -> (when, queue)
        self._queues: dict[tuple[int, str], tuple[float, dict | None]] = {}
        self._batch_ports: dict[tuple[int, int, bool], dict | None] = {}  # by (netns, server port, client end)
        self._waiting: dict[int, float] = {}  # incident id -> when its report began to wait for a scan
        self.selection = None  # --container/--pod/--unit (tracer/host/workload.py Selection)
        self.conntrack = conntrack.Conntrack()
        conntrack.probe()  # its module loaded now, not at the first collision (a translation can only need it then)

    def watch(self, rec: dict) -> None:
        """Follow a collision's listener while its queue holds ghosts: tell
        when it overflows because of them, and when they are gone."""
        q = rec.get("listener")
        if not q or not q["ghosts"]:
            return
        key = (rec["netns"], q["listener"])
        if key in self.watched or len(self.watched) >= MAX_WATCHED:
            return
        path = self._ns_path(rec["netns"])
        base = _overflows(path)
        self.watched[key] = {**q, "server": rec["server"], "overflows_base": base, "overflows": 0,
                             "collision": rec["id"]}

    def poll(self) -> list[dict]:
        """`queue` records for watched listeners whose state changed: it
        overflowed (new connections dropped while ghosts fill the queue), the
        ghosts changed, or they are gone. (And closes the sock_diag sockets
        left idle.)"""
        self.pool.close_idle()
        self.conntrack.close_idle()
        if not self.watched or time.monotonic() - self._polled < WATCH_INTERVAL_S:
            return []
        self._polled = time.monotonic()
        out = []
        for (netns, listener), last in list(self.watched.items()):
            path = self._ns_path(netns)
            now = self._queue(netns, last["server"]) if path else None
            if now is None:  # the listener or its namespace is gone
                del self.watched[(netns, listener)]
                out.append(_queue_record(netns, last, "gone", last["overflows"]))
                continue
            total = _overflows(path)
            overflows = total - last["overflows_base"] if total is not None and last["overflows_base"] is not None \
                else 0
            event = None
            if overflows > last["overflows"] and now["ghosts"]:
                event = "overflow"
            elif now["ghosts"] != last["ghosts"] or now["full"] != last["full"]:
                event = "ghosts_gone" if not now["ghosts"] else "changed"
            if event is None:
                continue
            last.update(now, overflows=overflows)
            out.append(_queue_record(netns, last, event, overflows))
            if not now["ghosts"]:
                del self.watched[(netns, listener)]
        return out

    def close(self) -> None:
        self.pool.close()
        self.conntrack.close()

    def rest(self) -> None:
        """The tracer is quiet (no incident, no event for a while): drop the
        owners found so far and the namespaces' paths, so that memory at rest
        does not keep what a storm brought."""
        self.owners.forget()
        self.workloads.forget()
        self._ns_paths = {}
        self._ns_scanned = float("-inf")
        self._queues = {}

    def prefetch(self, ev: Event) -> None:
        """Find the owner as soon as the collision starts: by the time the
        incident is reported, its process may be gone. The inodes of a batch
        of events are looked up together by resolve()."""
        if ev.type in ("syn_challenged", "client_challenged") and ev.sk_ino:
            self.owners.want(ev.sk_ino)

    def resolve(self, force: bool = False) -> None:
        """After a batch of events: one /proc scan for the owners they asked
        for (when one is due; force: now). The sockets' states looked up for
        the incidents that ended in the batch are forgotten: the ones ending
        next are told them as they are then."""
        self.owners.resolve(force)
        self._batch_ports.clear()

    def _inodes(self, inc: Incident) -> list[int]:
        """The sockets whose owners an incident's report names: the
        lingering socket's, the connecting one's and the listener's (its queue
        asked for once per QUEUE_FRESH_S)."""
        out = [inc.closewait.get("inode"), inc.client_inode if inc.client_process is None else None]
        q = self._listener_queue(inc)
        if q is not None:
            out.extend(q["inodes"])
        return [i for i in out if i]

    def waiting(self, inc: Incident) -> bool:
        """Whether the incident's report should wait: the owner of one of
        its sockets was asked for and the /proc scan that finds it is not due
        yet (at most OWNER_WAIT_S: then it is reported as `lookup_deferred`)."""
        inodes = self._inodes(inc)
        for ino in inodes:
            self.owners.want(ino)
        if not any(self.owners.status(ino) == "pending" for ino in inodes):
            self._waiting.pop(inc.id, None)
            return False
        now = time.monotonic()
        return now - self._waiting.setdefault(inc.id, now) < OWNER_WAIT_S

    def _unknown(self, inode: int | None, owners: list) -> str | None:
        """Why a socket's owners are not named (None: they are)."""
        if owners:
            return None
        if not inode:
            return "never_accepted"
        status = self.owners.status(inode)
        return {"pending": "lookup_deferred", "not_readable": "not_readable"}.get(status, "not_held")

    def owner(self, o: Owner) -> dict:
        """An owner as reported: pid, comm, fd and its workload (unit,
        container, pod; None when its cgroups could not be read)."""
        return {**o.as_dict(), "workload": self.workloads.as_dict(o.pid, o.comm)}

    def context(self, inc: Incident) -> dict:
        self._waiting.pop(inc.id, None)
        inode = inc.closewait.get("inode")
        found = self.owners.lookup(inode) if inode else []
        owners = [self.owner(o) for o in found]
        ctx = {"owners": owners, "owners_unknown": self._unknown(inode, found), "listener": self.listener(inc)}
        if inc.may_have_missed_establishment:
            ctx["connection"] = self.connection(inc)
        if inc.client_inode and inc.client_process is None:
            # the connecting process: the one holding the client socket (the
            # tracepoint backend has no connect hook; at the RST the current
            # task is softirq context, not the connector)
            found = self.owners.lookup(inc.client_inode)
            if found:
                ctx["client_process"] = {"pid": found[0].pid, "comm": found[0].comm}
        proc = ctx.get("client_process") or inc.client_process
        if proc:
            ctx["client_process"] = {**proc, "workload": self.workloads.as_dict(proc["pid"], proc["comm"])}
        translator = self.translator(inc)
        if translator is not None:
            ctx["conntrack"] = translator
        if self.selection is not None:
            outside = self.selection.outside([inc.netns, inc.client_netns], named_processes(ctx))
            if outside is not None:
                ctx["outside_selection"] = outside
        return ctx

    def connection(self, inc: Incident) -> dict:
        """The new connection's sockets as the kernel lists them now, for an
        incident whose establishment the state hook may have missed: the
        states of the sockets on its tuple at each traced end (None: that end
        is not traced here, or its namespace could not be listed), and when
        they were asked for (CLOCK_MONOTONIC, the kernel events' clock). One
        dump per namespace and port serves every incident ending in a batch
        (a tracer that was stopped through a storm ends thousands at once)."""
        tuples = inc.ends()
        ends = {"server": (inc.netns, *tuples["server"]) if inc.seen_server else None,
                "client": (inc.client_netns, *tuples["client"]) if inc.client_netns is not None else None}
        out: dict = {}
        for end, where in ends.items():
            out[end] = None
            if where is None:
                continue
            netns, local, remote = where
            server_port = int((local if end == "server" else remote).rsplit(":", 1)[1])
            key = (netns, server_port, end == "client")  # the client's sockets by their remote port: one dump too
            if key not in self._batch_ports:
                path = self._ns_path(netns)
                try:
                    self._batch_ports[key] = (sockdiag.port_states(netns, path, server_port, self.pool, remote=key[2])
                                              if path else None)
                except (OSError, sockdiag.SockDiagError):
                    self._batch_ports[key] = None
            listed = self._batch_ports[key]
            if listed is not None:
                out[end] = list(listed.get((local, remote), []))
        out["at_ns"] = time.monotonic_ns()
        return out

    def translator(self, inc: Incident) -> dict | None:
        """The conntrack entry of the translation between the ends, where a
        namespace of this host makes it (tracer/host/conntrack.py): asked
        with the client's tuple (the entry's ORIGINAL one) when the client's
        end was seen, else with the server's (its REPLY one). None when no
        translation is possible (both ends on loopback)."""
        ends = inc.ends()
        if inc.seen_client or inc.translated is not None:
            local, remote = ends["client"]
            direction = "original"
        else:
            local, remote = ends["server"]
            direction = "reply"
        (src, sport), (dst, dport) = _addr_port(local), _addr_port(remote)
        if ipaddress.ip_address(src).is_loopback and ipaddress.ip_address(dst).is_loopback:
            return None
        self._scan_namespaces()
        first = [ns for ns in (inc.client_netns, inc.netns) if ns is not None]
        return self.conntrack.find(inc.family, direction, src, sport, dst, dport, self._ns_paths, first)

    def _scan_namespaces(self) -> None:
        """The host's namespaces listed again, at most once a second."""
        if time.monotonic() - self._ns_scanned >= 1.0:
            self._ns_scanned = time.monotonic()
            self._ns_paths = sockdiag.namespaces()

    def _ns_path(self, netns: int) -> str | None:
        if netns not in self._ns_paths:
            self._scan_namespaces()
        return self._ns_paths.get(netns)

    def listener(self, inc: Incident) -> dict | None:
        """The listener's queue as the incident ends, and the processes that
        hold the listening socket (`owners`): asked once for all the
        incidents on that listener that end within QUEUE_FRESH_S (a storm
        ends hundreds at once)."""
        q = self._listener_queue(inc)
        if q is None:
            return None
        out = {k: v for k, v in q.items() if k != "inodes"}
        # who holds the listening socket: the process that does not accept()
        out["owners"] = [self.owner(o) for ino in q["inodes"] for o in self.owners.lookup(ino)]
        out["owners_unknown"] = None if out["owners"] else next(
            (self._unknown(ino, []) for ino in q["inodes"]), "not_held")
        return out

    def _listener_queue(self, inc: Incident) -> dict | None:
        if not inc.seen_server:  # the server is elsewhere: its listener is not here to see
            return None
        key = (inc.netns, inc.server)
        now = time.monotonic()
        asked = self._queues.get(key)
        if asked is None or now - asked[0] >= QUEUE_FRESH_S:
            if len(self._queues) >= MAX_WATCHED:
                self._queues = {k: v for k, v in self._queues.items() if now - v[0] < QUEUE_FRESH_S}
            asked = self._queues[key] = (now, self._queue(inc.netns, inc.server))
        return asked[1]

    def _queue(self, netns: int, server: str) -> dict | None:
        """The listener's queue. The listeners alone first: a dump of them
        does not walk the kernel's table of established sockets (262,144
        buckets here: 3 ms a dump, 0.4 ms without); the queued children are
        listed only when the listener has any."""
        path = self._ns_path(netns)
        if path is None:
            return None
        port = _addr_port(server)[1]

        def listed(states: int) -> dict | None:
            socks = sockdiag.queue_sockets(netns, path, port, states, self.pool)
            return queue_for(inventory.listener_queues(socks), server)

        try:
            q = listed(LISTEN)
            if q is not None and q["recv_q"]:
                q = listed(QUEUE_STATES)
        except (OSError, sockdiag.SockDiagError):
            return None
        if q is None:
            return None
        return {k: q[k] for k in ("listener", "recv_q", "limit", "alive", "ghosts", "full", "inodes")}


def _overflows(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return sockdiag.listen_overflows(path)
    except (OSError, sockdiag.SockDiagError):
        return None


def _queue_record(netns: int, q: dict, event: str, overflows: int) -> dict:
    return {
        "type": "queue",
        "event": event,
        "netns": netns,
        "listener": q["listener"],
        "recv_q": q["recv_q"],
        "limit": q["limit"],
        "alive": q["alive"],
        "ghosts": q["ghosts"],
        "full": q["full"],
        "overflows": overflows,
        "collision": q["collision"],
        "explanation": _queue_text(q, event, overflows),
    }


def _queue_text(q: dict, event: str, overflows: int) -> str:
    head = (f"Listener {q['listener']}: {q['recv_q']} queued of {q['limit']}, {q['alive']} alive, "
            f"{q['ghosts']} dead (ghosts).")
    if event == "overflow":
        return (f"{head} The accept queue is full and {overflows} new connection(s) were dropped "
                "(TcpExtListenOverflows) since the collision: the ghosts take places that live connections need. "
                "Fix: make the application accept() its connections.")
    if event == "ghosts_gone":
        return f"{head} The ghosts are gone: the application accepted (or the listener was closed)."
    if event == "gone":
        return f"Listener {q['listener']} is gone (closed, or its namespace was removed)."
    return head
