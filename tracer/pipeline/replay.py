"""Replay a recording (tracer/pipeline/recording.py): no root, no BPF, the same
records the live run wrote, in any output mode.

The recorded frames drive the live run's Pipeline (tracer/pipeline/flow.py)
through the same calls the live session made, in the same order; each
incident gets the host context recorded for it. A damaged frame ends the
replay: everything before it has been analysed and written, then the error
names the offset.
"""

from __future__ import annotations

from collections.abc import Callable

from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.events import decode
from tracer.pipeline.flow import Pipeline, RecordedHost
from tracer.pipeline.records import Clock


class ReplayError(Exception):
    pass


def replay(path: str, sink: Callable[[dict], None], verbose: bool = False, all_events: bool = False) -> dict:
    """Write the recording's records to sink; returns (and writes) the summary."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            head = recording.read_header(f)
        except recording.RecordingError as e:
            raise ReplayError(f"{path}: {e}") from None
        host = RecordedHost()
        pipeline = Pipeline(Correlator(head["tcp_states"], head.get("hz"), Settings.from_header(head)),
                            Clock(head["clock_offset_ns"]), head["backend"], sink,
                            host=host, verbose=verbose, all_events=all_events)
        end: dict = {}

        def apply(fr: recording.Frame, contexts: dict[int, dict]) -> None:
            host.contexts.update(contexts)  # for the incidents reported after this frame
            if fr.kind == recording.EVENT:
                pipeline.feed(decode(fr.payload))
            elif fr.kind == recording.LOST:
                pipeline.lost(fr.u64())
            elif fr.kind == recording.SKIPPED:
                runs, only_state_hook = fr.u64s()
                pipeline.skipped(runs, only_state_hook=bool(only_state_hook))
            elif fr.kind == recording.EVICTED:
                pipeline.evicted(recording.evicted_keys(fr.json()))
            elif fr.kind == recording.STATE_HOOK:
                hook = fr.json()
                pipeline.state_hook(hook["attached"], hook["at_ns"])
            elif fr.kind == recording.TICK:
                pipeline.tick(fr.u64())
            elif fr.kind == recording.FLUSH:
                pipeline.flush()
            elif fr.kind == recording.QUEUE:
                pipeline.queue(fr.json())
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
        kernel = end.get("kernel")
        if isinstance(kernel, dict):
            kernel = {k: v for k, v in kernel.items() if k not in ("reported", "unreported", "by_server_omitted")}
        rec = pipeline.finish(end.get("stopped_by", "recording cut short"), end.get("state_hook"),
                              kernel if isinstance(kernel, dict) and "collisions" in kernel else None, replay_of={
            "path": path, "kernel": head.get("kernel"), "backend": head["backend"], "tracer": head.get("tracer"),
            "duration_s": end.get("duration_s")})
        if error is not None:
            raise ReplayError(f"{path}: {error}; everything before it was replayed")
        return rec
