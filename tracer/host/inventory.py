"""Who is leaking sockets here: CLOSE_WAIT sockets by process and port, and
listeners whose accept queue holds dead children ("ghosts").

`build()` is pure (sockets and owners in, a record out) so it can be tested
on synthetic input; `snapshot()` gathers them from the running host.

Accept-queue arithmetic (the original write-up's second experiment: why Recv-Q
differs from the count of CLOSE_WAIT and ESTABLISHED sockets). A listener's Recv-Q
is sk_ack_backlog: every child queued and not yet accept()ed, alive or dead.
A queued child has no struct socket yet (inode 0) and, while alive, is
listed in ESTABLISHED or CLOSE_WAIT with the listener's local port; once an
RST kills it, it leaves the socket tables but stays in the queue, counted.
So ghosts = Recv-Q - the queued children still listed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import defaultdict
from collections.abc import Callable

from tracer.host import procfs, sockdiag
from tracer.host.procfs import Owner
from tracer.host.sockdiag import Sock
from tracer.host.workload import Workloads
from tracer.pipeline.records import short_name

WorkloadOf = Callable[[int, str], dict | None]  # (pid, comm) -> the workload's JSON form

QUEUED_ALIVE_STATES = ("ESTABLISHED", "CLOSE_WAIT")
NO_PROCESS = "no process: never accept()ed"


def _age_s(s: Sock) -> float | None:
    return None if s.last_ack_recv_ms is None else round(s.last_ack_recv_ms / 1000, 3)


def _listener_of(child: Sock, groups: dict[tuple, list[Sock]], wildcard: dict[tuple, tuple]) -> tuple | None:
    """The listener group `child` was accepted from: the one bound to its
    exact address, else the wildcard one (by netns, family and port)."""
    exact = (child.netns, child.family, child.laddr, child.lport)
    if exact in groups:
        return exact
    return wildcard.get((child.netns, child.family, child.lport))


def listener_queues(socks: list[Sock]) -> list[dict]:
    """Each listener with its queue: length, limit, alive and dead children.
    Listeners sharing an address (SO_REUSEPORT) are one group: the kernel does
    not say which of them a child belongs to."""
    groups: dict[tuple, list[Sock]] = defaultdict(list)
    for s in socks:
        if s.state == "LISTEN":
            groups[(s.netns, s.family, s.laddr, s.lport)].append(s)
    wildcard = {(netns, family, lport): (netns, family, laddr, lport) for netns, family, laddr, lport in groups
                if ipaddress.ip_address(laddr).is_unspecified}
    alive: dict[tuple, list[Sock]] = defaultdict(list)
    for s in socks:
        if s.state in QUEUED_ALIVE_STATES and s.inode == 0:
            key = _listener_of(s, groups, wildcard)
            if key is not None:
                alive[key].append(s)
    out = []
    for key, members in sorted(groups.items()):
        queued = sum(m.recv_q for m in members)
        limit = sum(m.send_q for m in members)
        children = alive.get(key, [])
        out.append({
            "netns": key[0],
            "family": key[1],
            "listener": members[0].local,
            "sockets": len(members),
            "inodes": [m.inode for m in members],
            "recv_q": queued,
            "limit": limit,
            "alive": len(children),
            "alive_states": dict(sorted(_count(c.state for c in children).items())),
            "ghosts": max(queued - len(children), 0),
            "full": queued > limit,  # sk_acceptq_is_full(): new children are refused
        })
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for i in items:
        out[i] += 1
    return out


def closewait_groups(socks: list[Sock], owners: dict[int, list[Owner]],
                     workload_of: WorkloadOf | None = None) -> list[dict]:
    """CLOSE_WAIT sockets grouped by holding process and local port, and the
    processes by workload (unit, container, pod): the workloads holding the
    most first, then their biggest groups."""
    groups: dict[tuple, list[tuple[Sock, Owner | None]]] = defaultdict(list)
    for s in socks:
        if s.state != "CLOSE_WAIT":
            continue
        holders = owners.get(s.inode, []) if s.inode else []
        owner = holders[0] if holders else None
        key = (owner.pid, owner.comm) if owner else (None, NO_PROCESS)
        groups[key + (s.netns, s.local)].append((s, owner))
    out = []
    for (pid, comm, netns, local), members in groups.items():
        ages = [a for a in (_age_s(s) for s, _ in members) if a is not None]
        out.append({
            "pid": pid,
            "comm": comm,
            "workload": workload_of(pid, comm) if workload_of is not None and pid is not None else None,
            "netns": netns,
            "local": local,
            "count": len(members),
            "oldest_age_s": max(ages) if ages else None,
            "newest_age_s": min(ages) if ages else None,
            "unread_bytes": sum(s.unread_bytes for s, _ in members),
            "sockets": [{
                "remote": s.remote, "inode": s.inode or None, "fd": o.fd if o else None,
                "age_s": _age_s(s), "unread_bytes": s.unread_bytes,
            } for s, o in sorted(members, key=lambda m: -(m[0].last_ack_recv_ms or 0))],
        })
    named = [(short_name(g["workload"]) or "", g) for g in out]  # each group's workload named once
    per_workload: dict[str, int] = defaultdict(int)
    for name, g in named:
        per_workload[name] += g["count"]
    named.sort(key=lambda ng: (-per_workload[ng[0]], ng[0], -ng[1]["count"], ng[1]["pid"] or 0, ng[1]["local"]))
    return [g for _, g in named]


def build(socks: list[Sock], owners: dict[int, list[Owner]], namespaces: int, port: int | None = None,
          workload_of: WorkloadOf | None = None) -> dict:
    if port is not None:
        socks = [s for s in socks if port in (s.lport, s.rport)]
    cw = closewait_groups(socks, owners, workload_of)
    listeners = listener_queues(socks)
    return {
        "type": "inventory",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "namespaces": namespaces,
        "closewait_total": sum(g["count"] for g in cw),
        "closewait": cw,
        "listeners": [q for q in listeners if q["ghosts"] or q["full"]],
        "listeners_total": len(listeners),
        "age_source": "estimated: time since each socket last received an ACK (tcp_info last_ack_recv)",
    }


SNAPSHOT_STATES = sockdiag.STATE_BITS["CLOSE_WAIT"] | sockdiag.STATE_BITS["LISTEN"] | sockdiag.STATE_BITS["ESTABLISHED"]


def snapshot(port: int | None = None, netns: int | None = None, family: str | None = None) -> dict:
    paths = sockdiag.namespaces()
    families = (family,) if family else ("ipv4", "ipv6")
    socks = sockdiag.list_sockets(SNAPSHOT_STATES, netns, families, paths)
    wanted = {s.inode for s in socks if s.state == "CLOSE_WAIT" and s.inode}
    owners = procfs.socket_owners(wanted) if wanted else {}
    return build(socks, owners, len(paths) if netns is None else int(netns in paths), port, Workloads().as_dict)
