"""The kernel side's tracking of collisions in progress (bpf/tcpcollide.h:
map `tracked`, by tuple, and map `tracking`, the window outside which the
hooks skip the `tracked` lookup), driven from user space."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

from tracer.pipeline.events import ENUMS

SWEEP_S = 5.0  # how often `tracked` is swept of entries no incident will end
STALE_NS = 5_000_000_000  # an entry this old with no incident open on its tuple is stale


class Tracking:
    """`added()`: the entries the programs added to `tracked` since counting
    began (tracer/kernel/counters.py). A full LRU map evicts an entry to make
    room for a new one, silently; what it evicted is what was added and is
    neither deleted by user space nor left: counted at every sweep, and the
    open incidents whose entries are gone then are told (evicted keys)."""

    def __init__(self, bpf, added: Callable[[], int] | None = None):
        self.tracked = bpf["tracked"]
        self.window = bpf["tracking"]
        self._kept = False
        self._swept_at = float("-inf")
        self.swept = 0  # stale entries deleted so far
        self.entries = 0  # entries at the last sweep
        self._added = added
        self._before = sum(1 for _ in self.tracked.keys()) if added is not None else 0  # there before counting
        self.deleted = 0  # entries user space deleted (stale or ended)
        self.evicted = 0  # entries the map evicted, at the last sweep

    @staticmethod
    def _key_of(key) -> tuple:
        fam = key.family
        n = 16 if fam == 10 else 4
        return (fam, bytes(key.saddr)[:n], key.sport, bytes(key.caddr)[:n], key.cport)

    def sweep(self, open_keys, force: bool = False) -> list[tuple]:
        """Delete the entries of collisions that no incident in user space
        will ever end: registered at least STALE_NS ago, on a tuple with no
        incident open (their first event was lost, or the user's filters left
        them out). Left alone they would make that tuple's later connections
        stream events, and take room from collisions in progress (`tracked`
        is an LRU: a full map evicts an entry that may still be in use).
        Every SWEEP_S at most. Returns the keys of open incidents whose
        entries the map evicted since the last sweep (only when it evicted
        any: an open incident's entry is deleted by nobody else)."""
        now = time.monotonic()
        if not force and now - self._swept_at < SWEEP_S:
            return []
        self._swept_at = now
        # added is read before the entries are: one added meanwhile is seen
        # left, never counted as evicted (the count catches up next time)
        added = self._added() if self._added is not None else None
        now_ns = time.monotonic_ns()  # the clock of bpf_ktime_get_ns()
        stale = []
        live = set()
        for key, tr in self.tracked.items():
            k = self._key_of(key)
            live.add(k)
            if now_ns - tr.first_ns >= STALE_NS and k not in open_keys:
                stale.append(key)
        gone: list[tuple] = []
        if added is not None:
            evicted = max(self.evicted, added + self._before - self.deleted - len(live))
            if evicted > self.evicted:
                gone = [k for k in open_keys if k not in live]
            self.evicted = evicted
        for key in stale:
            try:
                del self.tracked[key]
                self.deleted += 1
            except KeyError:
                pass
        self.swept += len(stale)
        self.entries = len(live) - len(stale)
        return gone

    def counts(self) -> dict:
        """For the summary's `kernel` part."""
        return {"tracked_entries": self.entries, "tracked_swept": self.swept, "tracked_evicted": self.evicted}

    def untrack(self, inc) -> None:
        """An incident ended: stop streaming its tuple's events. Not a newer
        collision on the same tuple: the entry was registered
        (bpf_ktime_get_ns) before this incident's last event. (Its socket may
        be one this incident never saw: the kernel side also tracks
        collisions the user's filters leave out, such as the server's end of
        a collision traced from the client's namespace.)"""
        for tup in inc.keys:
            key = self.tracked.Key()
            family, saddr, sport, caddr, cport = tup
            key.family, key.sport, key.cport = family, sport, cport
            key.saddr = (ctypes.c_ubyte * 16)(*saddr.ljust(16, b"\0"))
            key.caddr = (ctypes.c_ubyte * 16)(*caddr.ljust(16, b"\0"))
            try:
                if self.tracked[key].first_ns <= max(inc.last_ns, inc.first_ns):
                    del self.tracked[key]
                    self.deleted += 1
            except KeyError:
                pass

    def keep(self, busy: bool) -> None:
        """Hold the tracking window open while incidents are open (or events
        wait to be ordered); let it close after."""
        if busy == self._kept:
            return
        self.window[self.window.Key(ENUMS["tc_window"]["TC_WIN_KEEP"])] = self.window.Leaf(int(busy))
        self._kept = busy
