"""The kernel side's tracking of collisions in progress (bpf/tcpcollide.h:
map `tracked`, by tuple, and map `tracking`, the window outside which the
hooks skip the `tracked` lookup), driven from user space."""

from __future__ import annotations

import ctypes

from tracer.pipeline.events import ENUMS


class Tracking:
    def __init__(self, bpf):
        self.tracked = bpf["tracked"]
        self.window = bpf["tracking"]
        self._kept = False

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
