"""Which process holds a socket: a scan of /proc/*/fd (what `ss -p` does).

A socket's file descriptor names its inode (`socket:[INODE]`), the same inode
the BPF side reads from the socket (struct socket's inode). Processes in any
network namespace are visible from the host's /proc. Threads share their
process's descriptor table, so one entry per process (tgid) is enough.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    __slots__ = ("pid", "comm", "fd")  # a scan of a leaking host makes 100,000 of them
    pid: int
    comm: str  # untrusted text: a process names itself
    fd: int

    def as_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "fd": self.fd}


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return "?"


def socket_owners(wanted: set[int] | None = None) -> dict[int, list[Owner]]:
    """Socket inode -> the processes holding it (pid order). `wanted`: only
    these inodes (None: every socket on the host)."""
    out: dict[int, list[Owner]] = {}
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or a kernel thread
        comm = None
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            ino = int(target[8:-1])
            if wanted is not None and ino not in wanted:
                continue
            if comm is None:
                comm = _comm(pid)
            out.setdefault(ino, []).append(Owner(int(pid), comm, int(fd)))
    return out


class OwnerCache:
    """Owners of sockets, looked up as collisions arrive. A miss rescans
    /proc, at most once per `min_interval_s`, so a storm of collisions costs
    a bounded number of scans; a scan's findings are kept (a later collision
    on a socket that existed then needs no scan), at most `max_entries`."""

    def __init__(self, min_interval_s: float = 0.5, max_entries: int = 65536, scan=socket_owners):
        self.min_interval_s = min_interval_s
        self.max_entries = max_entries
        self._scan = scan
        self._known: dict[int, list[Owner]] = {}
        self._last_scan = float("-inf")

    def lookup(self, inode: int) -> list[Owner]:
        if not inode:
            return []
        if inode not in self._known and time.monotonic() - self._last_scan >= self.min_interval_s:
            self._last_scan = time.monotonic()
            found = self._scan()
            if len(found) > self.max_entries:  # more sockets than the cache holds: the one asked for, and some
                asked = found.pop(inode, None)
                found = dict(itertools.islice(found.items(), self.max_entries - 1))
                if asked:
                    found[inode] = asked
            if len(self._known) + len(found) > self.max_entries:
                self._known.clear()
            self._known.update(found)
        return self._known.get(inode, [])
