"""A live tracing session: load, stream, correlate, report, detach.

The only module that touches bcc at run time. Everything it attaches is
detached on every way out: the end of --duration/--count, Ctrl-C, SIGTERM,
SIGHUP, and errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tracer.kernel import bpfsys, hooks, capabilities, program, selftest
from tracer.pipeline import recording
from tracer.host.diagnosis import Diagnoser
from tracer.pipeline.correlator import Correlator, Incident, Settings
from tracer.pipeline.events import ENUMS, DecodeError, decode, encode
from tracer.pipeline.reorder import Reorderer
from tracer.pipeline.records import Clock, Summary, collision_record, event_stream_record, ready_record

POLL_MS = 100
# The lazy state hook (tracepoint backend, raw tracepoint): detached this long
# after the last kernel event once no incident is open.
STATE_HOOK_LINGER_S = 1.0
# It must be back before the client's retry, which comes TCP_TIMEOUT_MIN = 2
# jiffies after its reset at the soonest (Linux >= 5.6). It is lazy only where
# a trial attach at start takes at most a quarter of that, and is kept attached
# from the first collision on whose event it followed by more than half of it.
RETRY_JIFFIES = 2
SKIPPED_CHECK_S = 1.0  # how often the kernel's count of skipped BPF runs is read
PERF_PAGES = 64  # per CPU


@dataclass
class Options:
    filters: program.Filters = field(default_factory=program.Filters)
    backend: str = "auto"
    btf: str | None = None
    kernel_types: str = "auto"  # auto | btf | headers
    duration: float | None = None
    count: int | None = None
    verbose: bool = False
    all_events: bool = False  # stream every kernel event as an `event` record
    selftest: bool = True
    incident_timeout: float | None = None  # seconds; None: the correlator's default (Settings)
    reorder_delay: float = 0.1
    record: str | None = None  # write a recording here (tracer/pipeline/recording.py)
    metrics: str | None = None  # serve Prometheus metrics on HOST:PORT (tracer/output/metrics.py)
    # lazy: where the state-change hook is a raw tracepoint, attach it only while collisions are in progress
    # (every state change of every socket of the host otherwise runs it); always: keep it attached
    state_hook: str = "lazy"


class Stop(Exception):
    """Raised inside the loop by a signal handler."""


class Session:
    def __init__(self, options: Options, sink: Callable[[dict], None]):
        self.options = options
        self.sink = sink
        self.bpf = None
        self.backend = "tracepoint"
        self.correlator: Correlator | None = None
        self.reorder = Reorderer(int(options.reorder_delay * 1e9))
        self.summary = Summary()
        self.clock = Clock.now()
        self.decode_errors = 0
        self.stopped_by = ""
        self._stop_reason: str | None = None
        self._stopping = False
        self.plan = None
        self.types = None
        self.diagnoser = Diagnoser()
        self.recorder: recording.Writer | None = None
        self.metrics = None
        self._record_file = None
        self._tracking_kept = False
        self._prog_fds: list[int] = []
        self._skipped_base: int | None = None  # None: the kernel does not count them (before 5.12)
        self.skipped_runs: int | None = None
        self._skipped_checked = 0.0
        self._state_tp: bytes | None = None  # the lazy state hook's raw tracepoint (None: not lazy)
        self._state_attached = True
        self._last_event = float("-inf")
        self._state_hook_error: capabilities.KernelError | None = None
        self._retry_ns = 0  # the soonest a client retries after its reset
        self._state_kept: str | None = None  # why the lazy hook stays attached from now on
        self.state_hook_attaches = 0
        self._state_slowest_ns = 0  # from a collision's first event to the hook back

    # -- start ---------------------------------------------------------------

    def start(self) -> dict:
        """Attach everything, prove it fires; returns (and emits) `ready`."""
        t0 = time.monotonic()
        capabilities.require_root()
        if self.options.record:
            try:
                self._record_file = open(self.options.record, "wb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise capabilities.KernelError(f"cannot write the recording {self.options.record}: {e.strerror}") from None
        self.plan, self.types, self.bpf = attach(self.options)
        self.bpf["events"].open_perf_buffer(self._on_raw, page_cnt=PERF_PAGES, lost_cb=self._on_lost)
        self._prog_fds = [f.fd for f in self.bpf.funcs.values()]
        self._skipped_base = self._kernel_skipped()
        self.skipped_runs = None if self._skipped_base is None else 0
        self.backend = self.plan.backend
        hz = capabilities.jiffies_hz()
        state_choice = self.plan.choice("set_state")
        if self.options.state_hook == "lazy" and state_choice.raw:
            self._state_tp = state_choice.candidate.targets[0].split(":", 1)[1].encode()
            self._retry_ns = RETRY_JIFFIES * 1_000_000_000 // (hz or 1000)
            took = self._trial_attach()
            if took > self._retry_ns // 4:
                self._state_tp = None
                state_choice.note = "; ".join(filter(None, (state_choice.note, (
                    f"kept attached: attaching it again took {took / 1e6:.2f} ms here, and a client may retry "
                    f"{self._retry_ns / 1e6:.0f} ms after its reset"))))
            else:
                state_choice.lazy = True
        settings = Settings()
        if self.options.incident_timeout is not None:
            settings = Settings(timeout_ns=int(self.options.incident_timeout * 1e9))
        self.correlator = Correlator(self.types.tcp_states, hz, settings)
        ready = ready_record(
            backend=self.backend,
            hooks=[c.as_dict() for c in self.plan.choices],
            types_source=self.types.source,
            filters=self.options.filters.as_dict(),
            startup_s=time.monotonic() - t0,
        )
        if self.options.metrics:
            from tracer.output.metrics import Metrics  # noqa: PLC0415 - only when asked for

            try:
                self.metrics = Metrics(self.options.metrics)
            except OSError as e:
                raise capabilities.KernelError(str(e)) from None
            self.metrics.ready(ready["hooks"])
        if self._record_file is not None:
            self.recorder = recording.Writer(self._record_file, {
                "kernel": ready["kernel"], "backend": self.backend, "types": self.types.source,
                "hooks": ready["hooks"], "filters": ready["filters"],
                "tcp_states": {str(k): v for k, v in self.types.tcp_states.items()}, "hz": self.correlator.hz,
                "clock_offset_ns": self.clock.offset_ns, **self.correlator.settings.header(),
            })
        if self._state_tp is not None:
            self._detach_state_hook()  # proven by the self-test; back when a collision starts
            capabilities.wait_rcu_grace_period()  # so that the first collision's attach is quick
        self.sink(ready)
        return ready

    # -- the lazy state hook ---------------------------------------------------

    def _trial_attach(self) -> int:
        """Detach the state hook (attached since the load, proven by the
        self-test), wait out the grace period a re-attach would wait for, and
        time one; returns the nanoseconds it took. Leaves it attached."""
        self.bpf.detach_raw_tracepoint(tp=self._state_tp)
        capabilities.wait_rcu_grace_period()
        t0 = time.monotonic_ns()
        self._bcc_attach_state_hook()
        return time.monotonic_ns() - t0

    def _bcc_attach_state_hook(self) -> None:
        try:
            self.bpf.attach_raw_tracepoint(tp=self._state_tp, fn_name=b"raw_tracepoint__" + self._state_tp)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            raise capabilities.KernelError(f"attaching the state hook ({self._state_tp.decode()}) again failed: {e}") from None

    def _attach_state_hook(self, first_ts_ns: int) -> None:
        """A collision started (its first event has `first_ts_ns`): the state
        changes that follow (the retry reaching the listener, both ends
        established) need the state hook. A raw tracepoint attaches in well
        under a millisecond; the client's retry comes 2 jiffies after its RST
        at the soonest. When it came back too late for that, it stays."""
        self._bcc_attach_state_hook()
        self._state_attached = True
        self.state_hook_attaches += 1
        self._note_state_hook(True)
        late = time.monotonic_ns() - first_ts_ns
        self._state_slowest_ns = max(self._state_slowest_ns, late)
        if late > self._retry_ns // 2 and self._state_kept is None:
            self._state_kept = (f"kept attached from then on: it was back {late / 1e6:.2f} ms after a collision's "
                                f"first event, and a client may retry {self._retry_ns / 1e6:.0f} ms after its reset")

    def _detach_state_hook(self) -> None:
        self._note_state_hook(False)  # before: a state change from now on may go unseen
        self.bpf.detach_raw_tracepoint(tp=self._state_tp)
        self._state_attached = False

    def _note_state_hook(self, attached: bool) -> None:
        at = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()
        self.correlator.state_hook(attached, at)
        if self.recorder is not None:
            self.recorder.state_hook(attached, at)

    def _idle_state_hook(self, keep: bool) -> None:
        if self._state_tp is not None and self._state_attached and not keep and self._state_kept is None \
                and time.monotonic() - self._last_event >= STATE_HOOK_LINGER_S:
            self._detach_state_hook()

    def _state_hook_summary(self) -> dict | None:
        if self._state_tp is None:
            return None
        return {"attaches": self.state_hook_attaches, "slowest_ms": round(self._state_slowest_ns / 1e6, 3),
                "kept_attached": self._state_kept}

    # -- stream ----------------------------------------------------------------

    def _on_raw(self, cpu, data, size) -> None:
        try:
            ev = decode(ctypes.string_at(data, size))
        except DecodeError:
            self.decode_errors += 1
            return
        if self.metrics is not None:
            self.metrics.events.inc()
        self._last_event = time.monotonic()
        if not self._state_attached and self._state_hook_error is None:
            try:
                self._attach_state_hook(ev.ts_ns)
            except capabilities.KernelError as e:  # raised by run(): ctypes would swallow it here
                self._state_hook_error = e
        self.reorder.push(ev)

    def _on_lost(self, count) -> None:
        if self.recorder is not None:
            self.recorder.lost(count)
        if self.metrics is not None:
            self.metrics.lost.inc(count)
        self.correlator.lost(count)

    def _kernel_skipped(self) -> int | None:
        """Runs of the tracer's programs the kernel skipped so far (the sum
        of their recursion_misses), or None when the kernel does not say."""
        infos = [bpfsys.prog_info(fd) for fd in self._prog_fds]
        if not infos or any(i is None for i in infos):
            return None
        return sum(i["recursion_misses"] for i in infos)

    def _check_skipped(self, force: bool = False) -> None:
        """Skipped runs are events nobody will ever see, and no perf buffer
        counts them: read the kernel's count now and then, and say it."""
        now = time.monotonic()
        if self._skipped_base is None or (not force and now - self._skipped_checked < SKIPPED_CHECK_S):
            return
        self._skipped_checked = now
        total = self._kernel_skipped()
        if total is None:
            return
        new = total - self._skipped_base - self.skipped_runs
        if new > 0:
            self.skipped_runs += new
            if self.metrics is not None:
                self.metrics.skipped.inc(new)

    def _emit(self, incidents: list[Incident]) -> None:
        for inc in incidents:
            self._untrack(inc)
            context = self.diagnoser.context(inc)
            if self.recorder is not None:
                self.recorder.context(inc.id, context)
            rec = collision_record(inc, self.clock, self.backend, self.options.verbose, context,
                                   self.types.tcp_states)
            self.summary.add(rec)
            if self.metrics is not None:
                self.metrics.collision(rec)
            self.sink(rec)
            self.diagnoser.watch(rec)
            if self.options.count and self.summary.collisions >= self.options.count:
                self._stop_reason = "count"

    def _untrack(self, inc: Incident) -> None:
        """Tell the kernel side to stop streaming this tuple's events."""
        table = self.bpf["tracked"]
        key = table.Key()
        family, saddr, sport, caddr, cport = inc.key
        key.family, key.sport, key.cport = family, sport, cport
        key.saddr = (ctypes.c_ubyte * 16)(*saddr.ljust(16, b"\0"))
        key.caddr = (ctypes.c_ubyte * 16)(*caddr.ljust(16, b"\0"))
        try:
            # not a newer collision on the same tuple: the entry was registered
            # (bpf_ktime_get_ns) before this incident's last event. (Its socket
            # may be one this incident never saw: the kernel side also tracks
            # collisions the user's filters leave out, such as the server's end
            # of a collision traced from the client's namespace.)
            if table[key].first_ns <= max(inc.last_ns, inc.first_ns):
                del table[key]
        except KeyError:
            pass

    def _keep_tracking(self) -> None:
        """While incidents are open (or events wait in the reorder buffer),
        hold the kernel side's tracking window open (map `tracking`: outside
        it the hooks skip the `tracked` lookup); let it close after."""
        keep = bool(self.correlator.open) or len(self.reorder) > 0
        self._idle_state_hook(keep)
        if keep == self._tracking_kept:
            return
        table = self.bpf["tracking"]
        table[table.Key(ENUMS["tc_window"]["TC_WIN_KEEP"])] = table.Leaf(int(keep))
        self._tracking_kept = keep

    def _pump(self) -> None:
        now = time.monotonic_ns()
        for ev in self.reorder.pop_ready(now):
            self._feed(ev)
        self.diagnoser.resolve()
        done = self.correlator.tick(now - self.reorder.delay_ns)
        if done and self.recorder is not None:
            self.recorder.tick(now - self.reorder.delay_ns)
        self._emit(done)
        self._keep_tracking()

    def _feed(self, ev) -> None:
        self.diagnoser.prefetch(ev)
        if self.recorder is not None:
            self.recorder.event(ev.raw or encode(ev))
        if self.options.all_events:
            self.sink(event_stream_record(ev, self.clock, self.types.tcp_states))
        self._emit(self.correlator.feed(ev))

    def run(self, on_idle: Callable[[Session], str | None] | None = None) -> dict:
        """Stream until --duration, --count, a signal, or on_idle(session) says stop.
        Returns (and emits) the `summary` record. Call inside signals()."""
        deadline = time.monotonic() + self.options.duration if self.options.duration else None
        try:
            while self._stop_reason is None:
                self.bpf.perf_buffer_poll(POLL_MS)
                if self._state_hook_error is not None:
                    raise self._state_hook_error
                self._pump()
                self._check_skipped()
                for rec in self.diagnoser.poll():
                    if self.recorder is not None:
                        self.recorder.queue(rec)
                    self.sink(rec)
                if deadline is not None and time.monotonic() >= deadline:
                    self._stop_reason = "duration"
                elif on_idle is not None and self._stop_reason is None:
                    self._stop_reason = on_idle(self)
        except Stop as e:
            self._stop_reason = str(e)
        return self.finish()

    @property
    def ready(self) -> bool:
        return self.correlator is not None

    def finish(self, reason: str | None = None) -> dict:
        """Flush what is known, write the summary."""
        if reason is not None:
            self._stop_reason = reason
        self._stopping = True  # a second signal must not cut the flush short
        self.bpf.perf_buffer_poll(0)
        self._check_skipped(force=True)
        for ev in self.reorder.drain():
            self._feed(ev)
        if self.recorder is not None:
            self.recorder.flush()
        self._emit(self.correlator.flush())
        rec = self.summary.record(self.correlator.events_seen, self.correlator.lost_events,
                                  self._stop_reason or "end", self.decode_errors, self.skipped_runs,
                                  self._state_hook_summary())
        if self.recorder is not None:
            self.recorder.end(rec)
        self.sink(rec)
        return rec

    @contextlib.contextmanager
    def signals(self):
        """SIGINT, SIGTERM and SIGHUP raise Stop in the main thread (once:
        while the session flushes and detaches, further signals are ignored).
        Install before start(), so no signal finds a half-attached tracer."""

        def handler(signum, frame):
            if not self._stopping:
                self._stopping = True
                raise Stop(signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def close(self) -> None:
        """Detach every program and free every map."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def attach(options: Options):
    """Select hooks, load, and prove each fires (unless options.selftest is
    off). A candidate that attached but stayed silent is excluded and the
    next one loaded instead. Returns (plan, kernel types, bpf).

    The perf buffer is not open yet: the self-test's own events are dropped
    in the kernel (perf_submit has no reader); only the counters move."""
    types = program.kernel_types(options.btf, options.kernel_types)
    probe = None
    if types.btf is not None and options.backend in ("auto", "fentry"):
        probe = lambda: program.fentry_probe(types)  # noqa: E731
    offer = hooks.gather(types.btf, probe)
    exclude: set[str] = set()
    while True:
        plan = hooks.select(offer, options.backend, exclude)
        bpf = program.load(program.build_spec(plan, types, options.filters))
        if not options.selftest:
            return plan, types, bpf
        try:
            quiet = selftest.run(plan, bpf)
            bpf["tracked"].clear()  # the self-test's collision
            bpf["tracking"].clear()  # and the window it opened
        except BaseException:
            bpf.cleanup()
            raise
        for choice in plan.choices:
            if choice.candidate is not None and choice.logical not in hooks.NOT_SELFTESTED:
                choice.verified = choice.candidate not in quiet
        if not quiet:
            return plan, types, bpf
        widened = exclude | {c.name for c in quiet}
        try:
            alternative = hooks.select(offer, options.backend, widened)
        except hooks.BackendError as e:
            bpf.cleanup()
            raise hooks.BackendError(f"{quiet[0].name} attached but never fired during the self-test: {e}") from e
        if any(alternative.choice(c.logical).candidate is not None for c in quiet):
            bpf.cleanup()
            exclude = widened
            continue
        for c in quiet:  # nothing can replace them: keep them, and say so
            plan.choice(c.logical).note = "attached but never fired during the self-test; " + hooks.WITHOUT.get(
                c.logical, "events from it may be missing")
        return plan, types, bpf
