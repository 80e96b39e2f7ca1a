"""Replay a recording (tracer/pipeline/recording.py): no root, no BPF, the same
records the live run wrote, in any output mode.

The recorded frames drive the live run's Pipeline (tracer/pipeline/flow.py)
through the same calls the live session made, in the same order; each
incident gets the host context recorded for it. A damaged frame ends the
replay: everything before it has been analysed and written, then the error
names the offset.

The filters a live run takes (-p, --netns, -4/-6) apply to the recorded
events as the kernel applies them (tracer/pipeline/filters.py). Several
recordings, made on the hosts at the two ends of the same connections, are
joined into one stream (tracer/pipeline/join.py).
"""

from __future__ import annotations

from collections.abc import Callable

from tracer.pipeline.filters import Filters
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.events import decode
from tracer.pipeline.flow import Pipeline, RecordedHost
from tracer.pipeline.records import Clock

NO_FILTERS = Filters()


class ReplayError(Exception):
    pass


def open_recording(path: str):
    """The open file (positioned after the header) and its header."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror}") from None
    try:
        return f, recording.read_header(f)
    except recording.RecordingError as e:
        f.close()
        raise ReplayError(f"{path}: {e}") from None


def queue_passes(rec: dict, filters: Filters) -> bool:
    """Whether a recorded `queue` record (a listener's accept queue) is the
    filters' (a `storm` record, of the whole run, always is)."""
    if rec.get("type") != "queue" or not filters.any:
        return True
    listener = str(rec.get("listener") or "")
    addr, _, port = listener.rpartition(":")
    if filters.port and port != str(filters.port):
        return False
    if filters.netns and rec.get("netns") != filters.netns:
        return False
    return not filters.family or ("[" in addr) == (filters.family == "ipv6")


# the frames that carry no time of their own, fed as they come (in a join too)
UNTIMED = (recording.LOST, recording.SKIPPED, recording.EVICTED, recording.QUEUE)


def apply_untimed(pipeline: Pipeline, fr: recording.Frame, filters: Filters) -> None:
    """Feed one UNTIMED frame: lost events, skipped runs, evicted tracking,
    a queue (or storm) record."""
    if fr.kind == recording.LOST:
        pipeline.lost(fr.u64())
    elif fr.kind == recording.SKIPPED:
        runs, only_state_hook = fr.u64s()
        pipeline.skipped(runs, only_state_hook=bool(only_state_hook))
    elif fr.kind == recording.EVICTED:
        pipeline.evicted(recording.evicted_keys(fr.json()))
    elif fr.kind == recording.QUEUE:
        rec = fr.json()
        if queue_passes(rec, filters):
            pipeline.queue(rec)


def kernel_counts(end: dict, filters: Filters) -> dict | None:
    """The kernel's counts a recording's end kept, to set beside what the
    replay reports. None under replay filters: the kernel counted the whole
    live selection, and its rows cannot say which collisions a port filter
    would keep."""
    kernel = end.get("kernel")
    if not isinstance(kernel, dict) or "collisions" not in kernel or filters.any:
        return None
    return {k: v for k, v in kernel.items() if k not in ("reported", "unreported", "by_server_omitted")}


def replay(path: str, sink: Callable[[dict], None], verbose: bool = False, all_events: bool = False,
           filters: Filters = NO_FILTERS, select: Callable[[list[dict]], str | None] | None = None) -> dict:
    """Write the recording's records to sink; returns (and writes) the
    summary. select: the workload filters (flow.selected). Several
    recordings: tracer/pipeline/join.py."""
    rec, error = replay_one(path, sink, verbose, all_events, filters, RecordedHost(select))
    if error is not None:
        raise ReplayError(error)
    return rec


def replay_one(path: str, sink: Callable[[dict], None], verbose: bool = False, all_events: bool = False,
               filters: Filters = NO_FILTERS, host: RecordedHost | None = None) -> tuple[dict, str | None]:
    """One recording: (the summary record, the error that cut it short or None).
    host: a RecordedHost of the caller's (a join looks at each incident)."""
    f, head = open_recording(path)
    with f:
        host = host if host is not None else RecordedHost()
        pipeline = Pipeline(Correlator(head["tcp_states"], head.get("hz"), Settings.from_header(head)),
                            Clock(head["clock_offset_ns"]), head["backend"], sink,
                            host=host, verbose=verbose, all_events=all_events)
        end: dict = {}

        def apply(fr: recording.Frame, contexts: dict[int, dict]) -> None:
            host.contexts.update(contexts)  # for the incidents reported after this frame
            if fr.kind == recording.EVENT:
                ev = decode(fr.payload)
                if filters.passes(ev):
                    pipeline.feed(ev)
            elif fr.kind in UNTIMED:
                apply_untimed(pipeline, fr, filters)
            elif fr.kind == recording.STATE_HOOK:
                hook = fr.json()
                pipeline.state_hook(hook["attached"], hook["at_ns"])
            elif fr.kind == recording.TICK:
                pipeline.tick(fr.u64())
            elif fr.kind == recording.FLUSH:
                pipeline.flush()
            elif fr.kind == recording.END:
                end.update(fr.json())
            pipeline.release()

        error = None
        held: recording.Frame | None = None  # applied once the context frames after it are read
        contexts: dict[int, dict] = {}
        try:
            try:
                for fr in recording.frames(f, f.tell()):
                    if fr.kind == recording.CONTEXT:
                        ctx = fr.json()
                        contexts[ctx.pop("id", None)] = ctx
                        continue
                    if held is not None:
                        apply(held, contexts)
                    held, contexts = fr, {}
            except recording.RecordingError as e:
                error = e
            if held is not None:
                apply(held, contexts)
        except Exception as e:  # noqa: BLE001 - a frame that decodes but cannot be analysed
            error = recording.RecordingError(f.tell(), f"unusable frame ({e})")
        host.ended = True
        if error is not None or not end:
            pipeline.correlator.cut()
            pipeline.flush()
        pipeline.release(force=True)
        pipeline.losses.undecodable = end.get("undecodable_events", 0)
        pipeline.losses.skipped_runs = end.get("skipped_runs")
        rec = pipeline.finish(end.get("stopped_by", "recording cut short"), end.get("state_hook"),
                              kernel_counts(end, filters), replay_of=replay_of(path, head, end, filters))
        return rec, (f"{path}: {error}; everything before it was replayed" if error is not None else None)


def replay_of(path: str, head: dict, end: dict, filters: Filters) -> dict:
    out = {"path": path, "kernel": head.get("kernel"), "backend": head["backend"], "tracer": head.get("tracer"),
           "duration_s": end.get("duration_s")}
    if filters.any:
        out["filters"] = filters.as_dict()
    return out

