"""The kernel side's tracking of collisions in progress (bpf/tcpcollide.h:
map `tracked`, by tuple, and map `tracking`, the window outside which the
hooks skip the `tracked` lookup), driven from user space."""

from __future__ import annotations

import ctypes
import time

from tracer.pipeline.events import ENUMS

SWEEP_S = 5.0  # how often `tracked` is swept of entries no incident will end
STALE_NS = 5_000_000_000  # an entry this old with no incident open on its tuple is stale


class Tracking:
    def __init__(self, bpf):
        self.tracked = bpf["tracked"]
        self.window = bpf["tracking"]
        self._kept = False
        self._swept_at = float("-inf")
        self.swept = 0  # stale entries deleted so far
        self.entries = 0  # entries at the last sweep

    @staticmethod
    def _key_of(key) -> tuple:
        fam = key.family
        n = 16 if fam == 10 else 4
        return (fam, bytes(key.saddr)[:n], key.sport, bytes(key.caddr)[:n], key.cport)

    def sweep(self, open_keys, force: bool = False) -> int:
        """Delete the entries of collisions that no incident in user space
        will ever end: registered at least STALE_NS ago, on a tuple with no
        incident open (their first event was lost, or the user's filters left
        them out). Left alone they would make that tuple's later connections
        stream events, and take room from collisions in progress (`tracked`
        is an LRU: a full map evicts an entry that may still be in use).
        Every SWEEP_S at most; returns how many it deleted."""
        now = time.monotonic()
        if not force and now - self._swept_at < SWEEP_S:
            return 0
        self._swept_at = now
        now_ns = time.monotonic_ns()  # the clock of bpf_ktime_get_ns()
        stale = []
        count = 0
        for key, tr in self.tracked.items():
            count += 1
            if now_ns - tr.first_ns >= STALE_NS and self._key_of(key) not in open_keys:
                stale.append(key)
        for key in stale:
            try:
                del self.tracked[key]
            except KeyError:
                pass
        self.swept += len(stale)
        self.entries = count - len(stale)
        return len(stale)

    def counts(self) -> dict:
        """For the summary's `kernel` part."""
        return {"tracked_entries": self.entries, "tracked_swept": self.swept}

    def untrack(self, inc) -> None:
        """An incident ended: stop streaming its tuple's events. Not a newer
        collision on the same tuple: the entry was registered
        (bpf_ktime_get_ns) before this incident's last event. (Its socket may
        be one this incident never saw: the kernel side also tracks
        collisions the user's filters leave out, such as the server's end of
        a collision traced from the client's namespace.)"""
        key = self.tracked.Key()
        family, saddr, sport, caddr, cport = inc.key
        key.family, key.sport, key.cport = family, sport, cport
        key.saddr = (ctypes.c_ubyte * 16)(*saddr.ljust(16, b"\0"))
        key.caddr = (ctypes.c_ubyte * 16)(*caddr.ljust(16, b"\0"))
        try:
            if self.tracked[key].first_ns <= max(inc.last_ns, inc.first_ns):
                del self.tracked[key]
        except KeyError:
            pass

    def keep(self, busy: bool) -> None:
        """Hold the tracking window open while incidents are open (or events
        wait to be ordered); let it close after."""
        if busy == self._kept:
            return
        self.window[self.window.Key(ENUMS["tc_window"]["TC_WIN_KEEP"])] = self.window.Leaf(int(busy))
        self._kept = busy
