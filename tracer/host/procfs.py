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


def read_comm(pid: str, proc: str = "/proc") -> str | None:
    """A process's name (untrusted text); None when it is gone or not ours to read."""
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


class Owners(dict):
    """Socket inode -> the processes holding it; `denied`: the processes whose
    descriptors this process may not read (another user's, without
    CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH): any socket not found may be theirs."""

    denied = 0


def socket_owners(wanted: set[int] | None = None) -> Owners:
    """Socket inode -> the processes holding it (pid order). `wanted`: only
    these inodes (None: every socket on the host)."""
    out = Owners()
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            out.denied += 1
            continue
        except OSError:
            continue  # gone, or a kernel thread
        try:
            _scan_process(pid, fd_dir, wanted, out)
        finally:
            os.close(fd_dir)
    return out


def _scan_process(pid: str, fd_dir: int, wanted: set[int] | None, out: dict[int, list[Owner]]) -> None:
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    comm = None
    for fd in fds:
        try:
            target = os.readlink(fd, dir_fd=fd_dir)  # relative to the open directory: no path walk per descriptor
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        ino = int(target[8:-1])
        if wanted is not None and ino not in wanted:
            continue
        if comm is None:
            found = read_comm(pid)
            comm = "?" if found is None else found
        out.setdefault(ino, []).append(Owner(int(pid), comm, int(fd)))


class OwnerCache:
    """Owners of sockets, looked up as collisions arrive. The inodes asked
    about since the last scan are pending; one scan of /proc serves them all
    (`resolve()` after a batch of events, or a lookup that misses), and
    keeps the owners of those alone (a storm's scan reads every descriptor
    of a server holding thousands: an entry for each would cost more than
    the reads). Scans are spaced by at least `min_interval_s`, and by
    `SCAN_SHARE` times the last scan's duration: on a host where a scan is
    slow (100,000 sockets: 0.3-0.5 s) a storm of collisions spends at most a
    fifth of the tracer's time in them. What scans found is kept (a later
    lookup of the same socket needs no scan), at most `max_entries` (about
    0.3 KiB each), and dropped when the tracer is quiet (`forget()`)."""

    SCAN_SHARE = 4

    def __init__(self, min_interval_s: float = 0.5, max_entries: int = 262144, scan=socket_owners):
        self.min_interval_s = min_interval_s
        self.max_entries = max_entries
        self._scan = scan
        self._known: dict[int, list[Owner]] = {}
        self._pending: set[int] = set()
        self._missing: set[int] = set()  # asked for, and no process held them at the scan after
        self._unreadable: set[int] = set()  # so, but some processes' descriptors could not be read
        self._next_scan = float("-inf")

    def want(self, inode: int) -> None:
        """An inode whose owner will be asked for: found by the next scan."""
        if inode and inode not in self._known and inode not in self._missing:
            self._pending.add(inode)

    def status(self, inode: int) -> str:
        """What is known of an inode's owners: "found", "pending" (asked for,
        the next scan is not due yet), "not_held" (no process held it at the
        scan after it was asked for), "not_readable" (not found, but that scan
        could not read some processes' descriptors) or "unasked"."""
        if inode in self._known:
            return "found"
        if inode in self._pending:
            return "pending"
        if inode in self._unreadable:
            return "not_readable"
        return "not_held" if inode in self._missing else "unasked"

    def resolve(self, force: bool = False) -> None:
        """Scan for the pending inodes, if a scan is due (force: now)."""
        if not self._pending or (not force and time.monotonic() < self._next_scan):
            return
        t0 = time.monotonic()
        found = self._scan(set(self._pending))
        if len(found) > self.max_entries:  # more sockets than the cache holds: the ones asked for, and some
            asked = {ino: found.pop(ino) for ino in self._pending if ino in found}
            found = dict(itertools.islice(found.items(), self.max_entries - len(asked)))
            found.update(asked)
        if len(self._known) + len(found) > self.max_entries:
            self._known.clear()
        self._known.update(found)
        if len(self._missing) > self.max_entries:
            self._missing.clear()
            self._unreadable.clear()
        self._missing.update(ino for ino in self._pending if ino not in found)
        if getattr(found, "denied", 0):
            self._unreadable.update(ino for ino in self._pending if ino not in found)
        self._pending.clear()
        took = time.monotonic() - t0
        self._next_scan = time.monotonic() + max(self.min_interval_s, self.SCAN_SHARE * took)

    def forget(self) -> None:
        """Drop what earlier scans found (the tracer is quiet: the next
        collision's scan sees the host as it is then). A storm's sockets, held
        or long closed, are not kept for the rest of the run."""
        self._known = {}
        self._missing = set()
        self._unreadable = set()

    def lookup(self, inode: int) -> list[Owner]:
        if not inode:
            return []
        if inode not in self._known and inode not in self._missing:
            self.want(inode)
            self.resolve()
        return self._known.get(inode, [])
