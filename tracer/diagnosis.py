"""What the host says about an incident, beyond the kernel events: the
process holding the lingering socket (/proc) and the listener's accept queue
(sock_diag). The only I/O between the correlator and the report; replays of
a recording have no host to ask and go without it."""

from __future__ import annotations

import ipaddress
import time

from tracer import inventory, sockdiag
from tracer.correlator import Incident
from tracer.events import Event
from tracer.procfs import OwnerCache

QUEUE_STATES = sockdiag.STATE_BITS["LISTEN"] | sockdiag.STATE_BITS["ESTABLISHED"] | sockdiag.STATE_BITS["CLOSE_WAIT"]


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


class Diagnoser:
    def __init__(self, owners: OwnerCache | None = None):
        self.owners = owners or OwnerCache()
        self._ns_paths: dict[int, str] = {}
        self._ns_scanned = float("-inf")

    def prefetch(self, ev: Event) -> None:
        """Find the owner as soon as the collision starts: by the time the
        incident is reported, its process may be gone."""
        if ev.type == "syn_challenged" and ev.sk_ino:
            self.owners.lookup(ev.sk_ino)

    def context(self, inc: Incident) -> dict:
        inode = inc.closewait.get("inode")
        owners = [o.as_dict() for o in self.owners.lookup(inode)] if inode else []
        return {"owners": owners, "listener": self.listener(inc)}

    def _ns_path(self, netns: int) -> str | None:
        if netns not in self._ns_paths and time.monotonic() - self._ns_scanned >= 1.0:
            self._ns_scanned = time.monotonic()
            self._ns_paths = sockdiag.namespaces()
        return self._ns_paths.get(netns)

    def listener(self, inc: Incident) -> dict | None:
        path = self._ns_path(inc.netns)
        if path is None:
            return None
        try:
            socks = sockdiag.list_sockets(QUEUE_STATES, inc.netns, ns_paths={inc.netns: path})
        except (OSError, sockdiag.SockDiagError):
            return None
        q = queue_for(inventory.listener_queues(socks), inc.server)
        if q is None:
            return None
        return {k: q[k] for k in ("listener", "recv_q", "limit", "alive", "ghosts", "full")}
