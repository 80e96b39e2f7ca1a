"""Replay a recording (tracer/pipeline/recording.py): no root, no BPF, the same
incidents the live run printed, in any output mode.

The frames are fed to a fresh correlator exactly as the live session fed
it; each incident gets the host context recorded for it. A damaged frame
ends the replay: everything before it has been analysed and written, then
the error names the offset.
"""

from __future__ import annotations

from collections.abc import Callable

from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Incident, Settings
from tracer.pipeline.events import decode
from tracer.pipeline.records import Clock, Summary, collision_record, event_stream_record


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
        states = head["tcp_states"]  # {number: name}, checked by read_header
        correlator = Correlator(states, head.get("hz"), Settings.from_header(head))
        clock = Clock(head["clock_offset_ns"])
        backend = head["backend"]
        summary = Summary()
        pending: list[Incident] = []
        end: dict = {}

        def emit(ctx: dict | None = None) -> None:
            while pending:
                inc = pending.pop(0)
                rec = collision_record(inc, clock, backend, verbose, ctx, states)
                summary.add(rec)
                sink(rec)
                ctx = None

        error = None
        try:
            for fr in recording.frames(f, f.tell()):
                if fr.kind == recording.CONTEXT:
                    ctx = fr.json()
                    while pending and pending[0].id != ctx.get("id"):
                        emit()  # an incident whose context was not recorded
                    if pending:
                        emit({k: v for k, v in ctx.items() if k != "id"})
                    continue
                emit()
                if fr.kind == recording.EVENT:
                    ev = decode(fr.payload)
                    if all_events:
                        sink(event_stream_record(ev, clock, states))
                    pending += correlator.feed(ev)
                elif fr.kind == recording.LOST:
                    correlator.lost(fr.u64())
                elif fr.kind == recording.STATE_HOOK:
                    hook = fr.json()
                    correlator.state_hook(hook["attached"], hook["at_ns"])
                elif fr.kind == recording.TICK:
                    pending += correlator.tick(fr.u64())
                elif fr.kind == recording.FLUSH:
                    pending += correlator.flush()
                elif fr.kind == recording.QUEUE:
                    sink(fr.json())
                elif fr.kind == recording.END:
                    end = fr.json()
        except recording.RecordingError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - a frame that decodes but cannot be analysed
            error = recording.RecordingError(f.tell(), f"unusable frame ({e})")
        emit()
        if error is not None or not end:
            pending += correlator.flush()
            emit()
        rec = summary.record(correlator.events_seen, correlator.lost_events,
                             end.get("stopped_by", "recording cut short"), end.get("undecodable_events", 0),
                             end.get("skipped_runs"), end.get("state_hook"))
        rec["replay_of"] = {"path": path, "kernel": head.get("kernel"), "backend": backend,
                            "tracer": head.get("tracer"), "duration_s": end.get("duration_s")}
        sink(rec)
        if error is not None:
            raise ReplayError(f"{path}: {error}; everything before it was replayed")
        return rec
