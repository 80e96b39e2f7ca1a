"""Put events from all CPUs back in kernel-timestamp order before correlating.

Each CPU has its own perf ring, in order; across rings a later event can be
read before an earlier one. Events are held `delay_ns` (kernel clock) and
released oldest first. Pure: the caller says what time it is.
"""

from __future__ import annotations

import heapq
import itertools

from tracer.pipeline.events import Event


class Reorderer:
    def __init__(self, delay_ns: int = 100_000_000):
        self.delay_ns = delay_ns
        self._heap: list[tuple[int, int, Event]] = []
        self._seq = itertools.count()
        self.released_ns = 0  # timestamp of the newest event released
        self.late = 0  # events that arrived after a newer one had been released

    def push(self, ev: Event) -> None:
        if ev.ts_ns < self.released_ns:
            self.late += 1
        heapq.heappush(self._heap, (ev.ts_ns, next(self._seq), ev))

    def pop_ready(self, now_ns: int) -> list[Event]:
        """Events old enough that no earlier one can still arrive."""
        out = []
        limit = now_ns - self.delay_ns
        while self._heap and self._heap[0][0] <= limit:
            out.append(heapq.heappop(self._heap)[2])
        if out:
            self.released_ns = max(self.released_ns, out[-1].ts_ns)
        return out

    def drain(self) -> list[Event]:
        out = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        if out:
            self.released_ns = max(self.released_ns, out[-1].ts_ns)
        return out

    def __len__(self) -> int:
        return len(self._heap)
