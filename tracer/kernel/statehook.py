"""The lazy state hook.

Every state change of every socket of the host runs the set_state hook. Where
it is a raw tracepoint (the tracepoint backend with BTF), it attaches in well
under a millisecond, so it is attached only while collisions are in
progress: the self-test proves it fires, it is detached at ready, attached
again from the perf callback at a collision's first kernel event, and
detached once no incident is open and no event came for LINGER_S.

It must be back before the client's retry, which comes TCP_TIMEOUT_MIN = 2
jiffies after its reset at the soonest (Linux >= 5.6). So it is lazy only
where a trial attach at start takes at most a quarter of that, and it stays
attached from the first collision on whose first event it followed by more
than half of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from tracer.kernel import capabilities

LINGER_S = 1.0
RETRY_JIFFIES = 2


class StateTwin:
    """The set_state program's twin (bpf/tracepoints.bpf.c,
    tc_set_state_twin) on the same raw tracepoint: it runs the state logic
    exactly when the kernel skips the first program on a CPU (a softirq that
    changed a socket's state while that program ran), so that no state
    change is lost to the kernel's recursion check. Attached beside the
    first program and detached with it; bcc keeps one program per raw
    tracepoint in its books, so this one is attached through libbcc
    directly, its link a file descriptor closed on detach (and by the kernel
    if the tracer dies)."""

    FUNCTION = b"tc_set_state_twin"

    def __init__(self, bpf, tracepoint: str):
        from bcc import BPF  # noqa: PLC0415 - bcc is imported where the kernel side is loaded

        self.tp = tracepoint.encode()
        self.prog = bpf.load_func(self.FUNCTION, BPF.RAW_TRACEPOINT)
        self.link: int | None = None

    def attach(self) -> None:
        from bcc.libbcc import lib  # noqa: PLC0415

        if self.link is None:
            fd = lib.bpf_attach_raw_tracepoint(self.prog.fd, self.tp)
            if fd < 0:
                raise capabilities.KernelError(
                    f"attaching the state hook's twin to {self.tp.decode()} failed: {os.strerror(-fd or 1)}")
            self.link = fd

    def detach(self) -> None:
        if self.link is not None:
            os.close(self.link)
            self.link = None


class LazyStateHook:
    """`on_change(attached, at_ns)` is told of every attach and detach
    (CLOCK_MONOTONIC ns, the clock of bpf_ktime_get_ns()), before a detach
    and after an attach, so that no state change it could miss goes untold."""

    def __init__(self, bpf, tracepoint: str, hz: int | None, on_change: Callable[[bool, int], None],
                 twin: StateTwin | None = None):
        self.bpf = bpf
        self.twin = twin  # attached and detached with it
        self.tp = tracepoint.encode()
        self.retry_ns = RETRY_JIFFIES * 1_000_000_000 // (hz or 1000)
        self.on_change = on_change
        self.attached = True  # attached by the load, proven by the self-test
        self.attaches = 0
        self.slowest_ns = 0  # from a collision's first event to the hook back
        self.kept: str | None = None  # why it stays attached from now on
        self.error: capabilities.KernelError | None = None  # raised by the session's loop
        self._last_event = float("-inf")
        self._syn_hits = 0  # the kernel's count when last asked

    def trial(self) -> int:
        """Detach it, wait out the grace period a re-attach would wait for,
        and time one attach; returns the nanoseconds it took. Leaves it attached."""
        self._detach_programs()
        capabilities.wait_rcu_grace_period()
        t0 = time.monotonic_ns()
        self._attach()
        return time.monotonic_ns() - t0

    def rest(self) -> None:
        """At ready: detach it until the first collision, and wait out the
        grace period so that the first attach is quick."""
        self._detach()
        capabilities.wait_rcu_grace_period()

    def event(self, first_ts_ns: int) -> None:
        """A kernel event came (its timestamp): a collision is in progress."""
        self._last_event = time.monotonic()
        if self.attached or self.error is not None:
            return
        try:
            self._attach()
        except capabilities.KernelError as e:  # raised by the loop: ctypes would swallow it here
            self.error = e
            return
        self.attached = True
        self.attaches += 1
        self.on_change(True, time.monotonic_ns())
        late = time.monotonic_ns() - first_ts_ns
        self.slowest_ns = max(self.slowest_ns, late)
        if late > self.retry_ns // 2 and self.kept is None:
            self.kept = (f"kept attached from then on: it was back {late / 1e6:.2f} ms after a collision's "
                         f"first event, and a client may retry {self.retry_ns / 1e6:.0f} ms after its reset")

    def idle(self, busy: bool, syn_hits: Callable[[], int] | None = None) -> None:
        """Between polls: detach it once nothing is in progress for LINGER_S.
        `syn_hits()`: the kernel's count of challenged SYNs (asked only when
        it would detach); while it moves, collisions are in progress even
        when none of their events reach user space (a perf buffer that
        refuses them in a storm)."""
        if not self.attached or busy or self.kept is not None:
            return
        if syn_hits is not None:
            hits = syn_hits()
            if hits != self._syn_hits:
                self._syn_hits = hits
                self._last_event = time.monotonic()
        if time.monotonic() - self._last_event >= LINGER_S:
            self._detach()

    def summary(self) -> dict:
        return {"attaches": self.attaches, "slowest_ms": round(self.slowest_ns / 1e6, 3), "kept_attached": self.kept}

    def _attach(self) -> None:
        """The first program, then its twin (the trial and the lateness are
        the first one's: the twin only covers the first one's skipped runs)."""
        try:
            self.bpf.attach_raw_tracepoint(tp=self.tp, fn_name=b"raw_tracepoint__" + self.tp)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            raise capabilities.KernelError(f"attaching the state hook ({self.tp.decode()}) again failed: {e}") from None
        if self.twin is not None:
            self.twin.attach()

    def _detach(self) -> None:
        self.on_change(False, time.monotonic_ns())  # before: a state change from now on may go unseen
        self._detach_programs()
        self.attached = False

    def _detach_programs(self) -> None:
        """The twin first: left alone on the tracepoint, it would take every
        state change as one the first program missed (bpf/tracepoints.bpf.c)."""
        if self.twin is not None:
            self.twin.detach()
        self.bpf.detach_raw_tracepoint(tp=self.tp)
