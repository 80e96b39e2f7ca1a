"""A live tracing session: the wiring of the kernel side (tracer/kernel), the
host (tracer/host) and the pipeline (tracer/pipeline/flow.py).

start() attaches and proves the hooks fire, run() streams perf buffer events
into the pipeline until --duration, --count or a signal, finish() flushes and
writes the summary, close() detaches. Everything attached is detached on
every way out: the end of --duration/--count, Ctrl-C, SIGTERM, SIGHUP, and
errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tracer import selftest
from tracer.kernel import capabilities, hooks, program
from tracer.kernel.bpfsys import SkippedRuns
from tracer.kernel.counters import KernelCounts
from tracer.kernel.statehook import LazyStateHook, StateTwin
from tracer.kernel.tracking import Tracking
from tracer.pipeline import recording
from tracer.host.diagnosis import Diagnoser
from tracer.host.workload import Selection, SelectionError, Selector
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.events import DecodeError, decode
from tracer.pipeline.flow import Pipeline
from tracer.output.render import inert
from tracer.pipeline.records import Clock, ready_record

POLL_MS = 100
REST_AFTER_S = 10.0  # quiet this long: caches dropped, heap trimmed (Session._rest_when_quiet)
CHECK_S = 1.0  # how often the kernel's counts (collisions, skipped runs, refused events) are read
SELECTION_S = 2.0  # how often --container/--pod/--unit are resolved to namespaces again
# The perf buffer: a budget shared by the CPUs, each CPU's part a power of two
# pages between the bounds. A burst of collisions lands on few CPUs on a
# small host (a 1,000-collision burst on 2 CPUs fills 256 KiB per CPU, not
# 2 MiB: docs/benchmarks.md); a big host spreads it over many.
# (A session once saw the programs stay loaded for seconds after exit with
# 512 pages per CPU; measured again with bpftool after SIGTERM, 64, 256 and
# 512 pages are all freed within 0.1 s, and test_signals_detach_everything
# checks it on every run.)
PERF_BUDGET = 16 << 20
PERF_PAGES_MIN, PERF_PAGES_MAX = 64, 512


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim):
    the compile leaves tens of MiB that LLVM freed but glibc keeps (and a
    storm's records some more), counted in the tracer's resident memory for as
    long as it runs. Nothing where the C library has no malloc_trim (not glibc)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def perf_pages(cpus: int, page: int = 4096) -> int:
    """Pages per CPU for the perf buffer."""
    want = max(1, PERF_BUDGET // (max(1, cpus) * page))
    pages = 1 << (want.bit_length() - 1)  # a power of two, as perf requires
    return max(PERF_PAGES_MIN, min(PERF_PAGES_MAX, pages))


PERF_PAGES = perf_pages(os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE"))


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
    web_config: str | None = None  # the metrics server's TLS and authentication (tracer/output/webconfig.py)
    # lazy: where the state-change hook is a raw tracepoint, attach it only while collisions are in progress
    # (every state change of every socket of the host otherwise runs it); always: keep it attached
    state_hook: str = "lazy"


class Stop(Exception):
    """Raised inside the loop by a signal handler."""


class Session:
    def __init__(self, options: Options, sink: Callable[[dict], None], flush: Callable[[], None] | None = None):
        self.options = options
        self.sink = sink
        self.flush = flush  # the sink buffers: flushed after each batch
        self.bpf = None
        self.backend = "tracepoint"
        self.clock = Clock.now()
        self.diagnoser = Diagnoser()
        self.pipeline: Pipeline | None = None
        self.state_hook: LazyStateHook | None = None  # None: not lazy (kept attached, or not a raw tracepoint)
        self.twin: StateTwin | None = None  # the raw set_state program's twin
        self.tracking: Tracking | None = None
        self.skipped: SkippedRuns | None = None
        self.kernel_counts: KernelCounts | None = None
        self.metrics = None
        self._record_file = None
        self.recorder: recording.Writer | None = None
        self._checked = 0.0
        self._checked_ns = 0
        self._events_last = 0
        self._quiet_since = 0.0
        self._rested = True  # start() trims the heap before ready
        self._losses_seen: dict[str, int] = {}
        self._lost_notices = 0  # events the perf buffer's loss notices told of
        self._lost_told = 0  # events the pipeline was told were lost
        self._stop_reason: str | None = None
        self._stopping = False
        self.selection: Selection | None = None  # --container/--pod/--unit
        self._selected_at = 0.0

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    @property
    def correlator(self) -> Correlator | None:
        return self.pipeline.correlator if self.pipeline is not None else None

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
        stages = Stages()
        if self.options.filters.workloads:
            self.selection = Selection([Selector(k, v) for k, v in self.options.filters.workloads])
            if not self.selection.refresh():
                raise SelectionError(f"no running process belongs to {self.selection.describe()}")
            self.diagnoser.selection = self.selection
            stages.done("selection")
        plan, types, self.bpf = attach(self.options, stages)
        self._select()
        self.bpf["events"].open_perf_buffer(self._on_raw, page_cnt=PERF_PAGES, lost_cb=self._on_lost)
        state_choice = plan.choice("set_state")
        tracepoint = state_choice.candidate.targets[0].split(":", 1)[1] if state_choice.raw else None
        if tracepoint is not None:
            self.twin = StateTwin(self.bpf, tracepoint)
            self.twin.attach()
        self.kernel_counts = KernelCounts(self.bpf, types.tcp_states)
        funcs = {name: f for name, f in self.bpf.funcs.items() if name != StateTwin.FUNCTION}
        self.skipped = SkippedRuns([f.fd for f in funcs.values()],
                                   [f.fd for name, f in funcs.items() if b"set_state" in name],
                                   self.kernel_counts.state_covered if self.twin is not None else None)
        self.kernel_counts.reset()  # the self-test's collision is not the host's
        self.tracking = Tracking(self.bpf, self.kernel_counts.tracked_added)
        self.backend = plan.backend
        hz = capabilities.jiffies_hz()
        if self.options.state_hook == "lazy" and tracepoint is not None:
            lazy = LazyStateHook(self.bpf, tracepoint, hz,
                                 lambda attached, at_ns: self.pipeline.state_hook(attached, at_ns), self.twin)
            took = lazy.trial()
            if took > lazy.retry_ns // 4:
                state_choice.note = "; ".join(filter(None, (state_choice.note, (
                    f"kept attached: attaching it again took {took / 1e6:.2f} ms here, and a client may retry "
                    f"{lazy.retry_ns / 1e6:.0f} ms after its reset"))))
            else:
                state_choice.lazy = True
                self.state_hook = lazy
            stages.done("state_hook_trial")
        settings = Settings()
        if self.options.incident_timeout is not None:
            settings = Settings(timeout_ns=int(self.options.incident_timeout * 1e9))
        correlator = Correlator(types.tcp_states, hz, settings)
        ready = ready_record(
            backend=self.backend,
            hooks=[c.as_dict() for c in plan.choices],
            types_source=types.source,
            filters={**self.options.filters.as_dict(), **({"workload_namespaces": self.selection.namespaces()}
                                                           if self.selection is not None else {})},
            startup_s=time.monotonic() - t0,
            stages_s=stages.took,
            object_cache=stages.object_cache.as_dict() if stages.object_cache is not None else None,
        )
        if self.options.metrics:
            from tracer.output.metrics import Metrics  # noqa: PLC0415 - only when asked for

            from tracer.output.webconfig import WebConfig, WebConfigError  # noqa: PLC0415

            try:
                web = WebConfig(self.options.web_config) if self.options.web_config else None
                self.metrics = Metrics(self.options.metrics, web=web)
            except WebConfigError as e:
                raise capabilities.KernelError(str(e)) from None
            except OSError as e:
                raise capabilities.KernelError(str(e)) from None
            self.metrics.ready(ready["hooks"])
        recorder = None
        if self._record_file is not None:
            recorder = self.recorder = recording.Writer(self._record_file, {
                "kernel": ready["kernel"], "backend": self.backend, "types": types.source,
                "hooks": ready["hooks"], "filters": ready["filters"],
                "tcp_states": {str(k): v for k, v in types.tcp_states.items()}, "hz": hz,
                "clock_offset_ns": self.clock.offset_ns, **settings.header(), **recording.host_identity(),
            }, on_stop=self._recording_stopped)
        self.pipeline = Pipeline(correlator, self.clock, self.backend, self.sink, host=self.diagnoser,
                                 verbose=self.options.verbose, all_events=self.options.all_events,
                                 reorder_delay_ns=int(self.options.reorder_delay * 1e9), recorder=recorder,
                                 metrics=self.metrics, on_close=self.tracking.untrack)
        self.pipeline.losses.skipped_runs = self.skipped.total
        # The start-up's garbage freed now, not as the first collision comes:
        # freeing the kernel's parsed BTF takes tens of milliseconds, which
        # would delay the perf callback that brings the lazy state hook back.
        # What is left is frozen, out of the collector's later passes.
        del types, plan, state_choice
        gc.collect()
        gc.freeze()
        _trim_heap()
        if self.state_hook is not None:
            self.state_hook.rest()  # proven by the self-test; back when a collision starts
        stages.done("settle")
        ready["stages_s"] = stages.took
        ready["startup_s"] = round(time.monotonic() - t0, 3)
        self._checked_ns = time.monotonic_ns()
        self.sink(ready)
        if self.flush is not None:
            self.flush()
        return ready

    # -- stream ----------------------------------------------------------------

    def _on_raw(self, cpu, data, size) -> None:
        try:
            ev = decode(ctypes.string_at(data, size))
        except DecodeError:
            self.pipeline.undecodable()
            return
        if self.state_hook is not None:
            self.state_hook.event(ev.ts_ns)
        self.pipeline.push(ev)

    def _on_lost(self, count) -> None:
        self._lost_notices += count
        self._account_lost(self._lost_notices)

    def _account_lost(self, total: int) -> None:
        """Events lost so far, by one of two counts of the same loss: the
        perf buffer's loss notices (late: the kernel writes one only with the
        next event it manages to write on that CPU, so the last loss of a
        burst may never be told) and the kernel's own count of the events the
        perf buffer refused (read at every poll). The correlator hears of
        whatever one says beyond what it was told already."""
        new = total - self._lost_told
        if new > 0:
            self._lost_told = total
            self.pipeline.lost(new)

    def _check_kernel(self, force: bool = False) -> dict | None:
        """Now and then: read what the kernel counted (collisions, skipped
        runs, events it could not pass on). Whatever was lost since the last
        look is said at once, in a `storm` record with the true counts.
        Returns the counts (None: not read this time)."""
        now = time.monotonic()
        if not force and now - self._checked < CHECK_S:
            return None
        self._checked = now
        counts = self.kernel_counts.read()
        evicted = self.tracking.sweep(self.pipeline.correlator.open.keys(), force=force)
        if evicted:
            self.pipeline.evicted(evicted)
        counts.update(self.tracking.counts())
        if self.metrics is not None:
            self.metrics.kernel(counts)
        losses = {
            "events_lost": self.pipeline.correlator.lost_events,
            "events_not_submitted": counts["events_not_submitted"],
            "runs_skipped": self.pipeline.losses.skipped_runs or 0,
            "events_undecodable": self.pipeline.losses.undecodable,
            "untracked": counts["untracked"],
            "uncounted": counts["uncounted"],
            "tracked_evicted": counts["tracked_evicted"],
        }
        at_ns = time.monotonic_ns()
        fresh = {k: v - self._losses_seen.get(k, 0) for k, v in losses.items() if v > self._losses_seen.get(k, 0)}
        if fresh:
            self.pipeline.storm(at_ns, self._checked_ns or at_ns, fresh, counts)
        self._losses_seen = losses
        self._checked_ns = at_ns
        self._rest_when_quiet(now)
        if self.selection is not None and now - self._selected_at >= SELECTION_S:
            self.selection.refresh()
            self._select()
        return counts

    def _select(self) -> None:
        """Map `netns_allowed` to the namespaces the selection's processes run
        in now (a restarted container comes back in a new one)."""
        if self.selection is None:
            return
        self._selected_at = time.monotonic()
        table = self.bpf["netns_allowed"]
        want = set(self.selection.netns)
        have = {k.value for k in table.keys()}
        for ino in have - want:
            with contextlib.suppress(KeyError):
                del table[table.Key(ino)]
        for ino in want - have:
            table[table.Key(ino)] = table.Leaf(1)

    def _rest_when_quiet(self, now: float) -> None:
        """Quiet for REST_AFTER_S after a collision or a storm: the host
        lookups' caches are dropped and the C heap trimmed, so that memory at
        rest goes back to where start-up left it."""
        events = self.pipeline.correlator.events_seen
        if self.pipeline.busy or events != self._events_last:
            self._events_last = events
            self._quiet_since = now
            self._rested = False
        elif not self._rested and now - self._quiet_since >= REST_AFTER_S:
            self._rested = True
            self.diagnoser.rest()
            gc.collect()
            _trim_heap()

    def _step(self) -> None:
        self._account_lost(self.kernel_counts.refused())  # before incidents it may touch can end
        state, other = self.skipped.new()
        if state or other:
            self.pipeline.skipped(state + other, only_state_hook=not other)
        self.pipeline.pump(time.monotonic_ns())
        busy = self.pipeline.busy
        self.tracking.keep(busy)
        if self.state_hook is not None:
            self.state_hook.idle(busy, self.kernel_counts.syn_hits)
        if self.options.count and self.pipeline.summary.collisions >= self.options.count:
            self._stop_reason = "count"

    def run(self, on_idle: Callable[[Session], str | None] | None = None) -> dict:
        """Stream until --duration, --count, a signal, or on_idle(session) says stop.
        Returns (and emits) the `summary` record. Call inside signals()."""
        deadline = time.monotonic() + self.options.duration if self.options.duration else None
        try:
            while self._stop_reason is None:
                self.bpf.perf_buffer_poll(POLL_MS)
                if self.state_hook is not None and self.state_hook.error is not None:
                    raise self.state_hook.error
                self._step()
                self._check_kernel()
                for rec in self.diagnoser.poll():
                    self.pipeline.queue(rec)
                if self.flush is not None:
                    self.flush()
                if self._stop_reason is not None:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self._stop_reason = "duration"
                elif on_idle is not None:
                    self._stop_reason = on_idle(self)
        except Stop as e:
            self._stop_reason = str(e)
        return self.finish()

    def finish(self, reason: str | None = None) -> dict:
        """Flush what is known, write the summary."""
        if reason is not None:
            self._stop_reason = reason
        self._stopping = True  # a second signal must not cut the flush short
        self.bpf.perf_buffer_poll(0)
        self._account_lost(self.kernel_counts.refused())
        counts = self._check_kernel(force=True)
        self.pipeline.flush()
        extra = {}
        if self.recorder is not None:
            extra["recording"] = {"path": self.options.record, **self.recorder.status()}
        return self.pipeline.finish(self._stop_reason or "end",
                                    self.state_hook.summary() if self.state_hook is not None else None, counts, **extra)

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

    def _recording_stopped(self, writer: recording.Writer) -> None:
        """A write to the recording failed (a full disk): tracing goes on, the
        recording stops where it is (it replays up to there), said once here
        and in the summary (`recording`)."""
        where = f" at {writer.stopped_at} bytes" if writer.stopped_at is not None else ""
        sys.stderr.write(f"tcpcollide-trace: error: the recording {inert(self.options.record)} stopped{where}: "
                         f"{writer.stopped}; tracing goes on, and the file replays up to there\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Detach every program and free every map."""
        if self.twin is not None:
            self.twin.detach()
            self.twin = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        if self._record_file is not None:
            try:
                self._record_file.close()
            except OSError:
                pass  # what it could not write is said already (_recording_stopped)
            self._record_file = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.diagnoser.close()


class Stages:
    """How long each stage of the start-up took (the `ready` record's `stages_s`)."""

    def __init__(self):
        self.took: dict[str, float] = {}
        self._t = time.monotonic()
        self.object_cache = None  # what the compiled-object cache did (tracer/kernel/objcache.py Outcome)

    def done(self, stage: str) -> None:
        now = time.monotonic()
        self.took[stage] = round(self.took.get(stage, 0.0) + now - self._t, 4)
        self._t = now


def attach(options: Options, stages: Stages | None = None):
    """Select hooks, load, and prove each fires (unless options.selftest is
    off). A candidate that attached but stayed silent is excluded and the
    next one loaded instead. Returns (plan, kernel types, bpf).

    The perf buffer is not open yet: the self-test's own events are dropped
    in the kernel (perf_submit has no reader); only the counters move."""
    stages = stages or Stages()
    types = program.kernel_types(options.btf, options.kernel_types)
    stages.done("kernel_types")
    probe = None
    if types.btf is not None and options.backend in ("auto", "fentry"):
        probe = lambda: program.fentry_probe(types)  # noqa: E731
    offer = hooks.gather(types.btf, probe)
    types.save()
    stages.done("hooks")
    exclude: set[str] = set()
    while True:
        plan = hooks.select(offer, options.backend, exclude)
        bpf, stages.object_cache = program.load_cached(program.build_spec(plan, types))
        stages.done("load_cached" if stages.object_cache.state == "hit" else "compile_load")
        try:
            options.filters.apply(bpf)
        except BaseException:
            bpf.cleanup()
            raise
        if not options.selftest:
            return plan, types, bpf
        try:
            quiet = selftest.run(plan, bpf)
            stages.done("selftest")
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
