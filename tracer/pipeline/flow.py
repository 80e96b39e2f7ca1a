"""One pipeline for live tracing and replay:

    kernel events -> ordering -> correlator -> records -> sinks

A live session (tracer/session.py) pushes events in the order the perf
buffer delivers them and pumps the clock; a replay (tracer/pipeline/replay.py)
feeds a recording's events, already in order, and ticks at the recorded
times. Both drive this one object, so a replay writes the live run's records
by construction: the same correlator calls, the same records, the same
summary.

What the host adds to an incident (the owner of the socket, the listener's
queue) comes from a `Host`: live, tracer/host/diagnosis.py asks /proc and
sock_diag; in a replay, `RecordedHost` gives back what the recording kept.

Sinks: `sink` takes every record written for the user (text, JSON or the
dashboard); `recorder` (tracer/pipeline/recording.py) logs the correlator's
input as it is fed; `metrics` (tracer/output/metrics.py) counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tracer.pipeline.correlator import Correlator, Incident
from tracer.pipeline.events import Event, encode
from tracer.pipeline.records import Clock, Summary, collision_record, event_stream_record, named_processes
from tracer.pipeline.reorder import Reorderer


class Host(Protocol):
    """What the host adds to incidents."""

    def prefetch(self, ev: Event) -> None:
        """An event was fed: start looking up what its incident will need."""

    def resolve(self, force: bool = False) -> None:
        """A batch of events was fed: finish the lookups they asked for
        (force: the last batch, finish them now)."""

    def waiting(self, inc: Incident) -> bool:
        """Whether an ended incident's report should wait for lookups in
        progress (it is asked again after each batch)."""

    def context(self, inc: Incident) -> dict | None:
        """The host's part of an incident's report, as it ends (None: nothing known)."""

    def watch(self, rec: dict) -> None:
        """A collision was reported."""


class NoHost:
    """Nothing from the host: incidents are reported as the kernel saw them."""

    def prefetch(self, ev: Event) -> None:
        pass

    def resolve(self, force: bool = False) -> None:
        pass

    def waiting(self, inc: Incident) -> bool:
        return False

    def context(self, inc: Incident) -> dict | None:
        return None

    def watch(self, rec: dict) -> None:
        pass


class RecordedHost(NoHost):
    """A replay's host: the context the live run recorded for each incident.
    The replay hands it the context frames that follow a frame before it
    feeds that frame (they were written as the incidents reported after it
    was fed were reported: those it ended, and those whose reports had
    waited for the live host's lookups). An incident waits for its context
    as it waited live; the end of the recording releases every one."""

    def __init__(self, select: Callable[[list[dict]], str | None] | None = None):
        self.contexts: dict[int, dict] = {}
        self.ended = False
        self.select = select

    def waiting(self, inc: Incident) -> bool:
        return not self.ended and inc.id not in self.contexts

    def context(self, inc: Incident) -> dict | None:
        return selected(self.contexts.pop(inc.id, None), self.select)


def selected(context: dict | None, select: Callable[[list[dict]], str | None] | None) -> dict | None:
    """A replay's workload selection (--container/--pod/--unit) applied to a
    recorded context: `select` takes the processes it names and says why the
    collision is not the selection's (None: it is). Not the selection's: the
    context says so (`outside_selection`), and the pipeline counts it
    instead of reporting it. A recording keeps no namespace's workloads, so
    a replay keeps a collision by the processes it names only."""
    if select is None:
        return context
    context = dict(context or {})
    why = select(named_processes(context))
    if why is not None:
        context["outside_selection"] = why
    return context


@dataclass
class Losses:
    """What the tracer could not follow besides lost perf buffer events
    (the correlator counts those, and marks the incidents they touch)."""

    undecodable: int = 0  # events that reached user space but could not be decoded
    skipped_runs: int | None = None  # BPF runs the kernel skipped (None: the kernel does not say)


class Pipeline:
    def __init__(self, correlator: Correlator, clock: Clock, backend: str, sink: Callable[[dict], None], *,
                 host: Host | None = None, verbose: bool = False, all_events: bool = False,
                 reorder_delay_ns: int = 0, recorder=None, metrics=None,
                 on_close: Callable[[Incident], None] | None = None):
        self.correlator = correlator
        if not verbose:
            correlator.raw_events = 0  # only a verbose report shows an incident's raw events
        self.clock = clock
        self.backend = backend
        self.sink = sink
        self.host = host or NoHost()
        self.verbose = verbose
        self.all_events = all_events
        self.reorder = Reorderer(reorder_delay_ns)
        self.recorder = recorder
        self.metrics = metrics
        self.on_close = on_close  # an incident ended (before it is reported)
        self.summary = Summary()
        self.losses = Losses()
        # Ended incidents in the order they ended, each reported once the
        # host's lookups for it are done and those before it are reported.
        self._held: deque[Incident] = deque()

    @property
    def busy(self) -> bool:
        """Incidents are open, or events wait to be ordered."""
        return bool(self.correlator.open) or len(self.reorder) > 0

    # -- inputs: live, in arrival order -----------------------------------------

    def push(self, ev: Event) -> None:
        """An event as the perf buffer delivered it: ordered by pump()."""
        self.reorder.push(ev)

    def pump(self, now_ns: int) -> None:
        """Kernel time is now_ns: feed the events old enough to be in order,
        then end the incidents whose wait is over."""
        for ev in self.reorder.pop_ready(now_ns):
            self.feed(ev)
        self.host.resolve()
        self.tick(now_ns - self.reorder.delay_ns)
        self.release()

    def undecodable(self) -> None:
        self.losses.undecodable += 1

    def skipped(self, runs: int, only_state_hook: bool = False) -> None:
        """The kernel skipped `runs` runs of the programs (recursion_misses;
        `only_state_hook`: all of them the state hook's): the incidents they
        may have touched are marked, as for a loss."""
        if self.losses.skipped_runs is None:
            self.losses.skipped_runs = 0
        self.losses.skipped_runs += runs
        if self.recorder is not None:
            self.recorder.skipped(runs, only_state_hook)
        if self.metrics is not None:
            self.metrics.skipped.inc(runs)
        self.correlator.skipped(runs, only_state_hook=only_state_hook)

    # -- inputs: in order (live after ordering, and a replay) -------------------

    def feed(self, ev: Event) -> None:
        self.host.prefetch(ev)
        if self.metrics is not None:
            self.metrics.events.inc()
        if self.recorder is not None:
            self.recorder.event(ev.raw or encode(ev))
        if self.all_events:
            self.sink(event_stream_record(ev, self.clock, self.correlator.states))
        self._report(self.correlator.feed(ev))

    def tick(self, at_ns: int) -> None:
        done = self.correlator.tick(at_ns)
        if done and self.recorder is not None:
            self.recorder.tick(at_ns)
        self._report(done)

    def lost(self, count: int) -> None:
        if self.recorder is not None:
            self.recorder.lost(count)
        if self.metrics is not None:
            self.metrics.lost.inc(count)
        self.correlator.lost(count)

    def evicted(self, keys: list[tuple]) -> None:
        """Map `tracked` evicted the entries of these open incidents (a full
        LRU): their later events were not streamed."""
        if self.recorder is not None:
            self.recorder.evicted(keys)
        self.correlator.evicted(keys)

    def state_hook(self, attached: bool, at_ns: int) -> None:
        self.correlator.state_hook(attached, at_ns)
        if self.recorder is not None:
            self.recorder.state_hook(attached, at_ns)

    def queue(self, rec: dict) -> None:
        """A `queue` record (a watched listener's accept queue changed)."""
        if self.recorder is not None:
            self.recorder.queue(rec)
        self.sink(rec)

    def flush(self) -> None:
        """The end: order and feed what is left, end every open incident."""
        for ev in self.reorder.drain():
            self.feed(ev)
        if self.recorder is not None:
            self.recorder.flush()
        self._report(self.correlator.flush())
        self.host.resolve(force=True)
        self.release(force=True)

    def storm(self, at_ns: int, since_ns: int, lost: dict[str, int], kernel: dict) -> None:
        """Loss since `since_ns` (kernel time; `lost`: what went missing, by
        kind): a `storm` record with the kernel's true counts so far beside
        what was reported, recorded like a queue record so that a replay
        writes it too."""
        rec = {"type": "storm", "time": self.clock.iso(at_ns), "since": self.clock.iso(since_ns),
               "seconds": round((at_ns - since_ns) / 1e9, 3), "lost": lost,
               "collisions_reported": self.summary.collisions, "kernel": self.summary.kernel(kernel)}
        if self.metrics is not None:
            self.metrics.storm()
        self.queue(rec)

    def finish(self, stopped_by: str, state_hook: dict | None = None, kernel: dict | None = None,
               **extra) -> dict:
        """Write (and return) the `summary` record. kernel: the kernel's own
        counts of collisions (None: not known); `extra` adds fields."""
        rec = self.summary.record(self.correlator.events_seen, self.correlator.lost_events, stopped_by,
                                  self.losses.undecodable, self.losses.skipped_runs, state_hook, kernel)
        rec.update(extra)
        if self.recorder is not None:
            self.recorder.end(rec)
            if isinstance(rec.get("recording"), dict):
                rec["recording"].update(self.recorder.status())  # the end itself may not have fitted
        self.sink(rec)
        return rec

    # -- outputs ------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Ended incidents whose reports wait for the host's lookups."""
        return len(self._held)

    def release(self, force: bool = False) -> None:
        """Report the ended incidents that no longer wait (force: all), in
        the order they ended."""
        while self._held and (force or not self.host.waiting(self._held[0])):
            self._emit(self._held.popleft())

    def _report(self, incidents: list[Incident]) -> None:
        for inc in incidents:
            if self.on_close is not None:
                self.on_close(inc)
            self._held.append(inc)
        if incidents:
            self.release()

    def _emit(self, inc: Incident) -> None:
        context = self.host.context(inc)
        if context is not None and self.recorder is not None:
            self.recorder.context(inc.id, context)
        if context and context.get("outside_selection"):
            # in a namespace shared with other workloads, and not the selection's (--container/--pod/--unit)
            self.summary.outside(context["outside_selection"], inc.view)
            return
        if context and context.get("connection"):
            self.correlator.confirm(inc, context["connection"])
        rec = collision_record(inc, self.clock, self.backend, self.verbose, context, self.correlator.states)
        self.summary.add(rec)
        if self.metrics is not None:
            self.metrics.collision(rec)
        self.sink(rec)
        self.host.watch(rec)
