"""The kernel's own counts beside what was reported, without root: synthetic
counts (the shape tracer/kernel/counters.py reads from the maps) through the
pipeline's summary and storm records, their text, a replay and the metrics."""

from __future__ import annotations

import io

from tests.synthetic import HZ, STATES, T0, S, Collision
from tracer.output.render import kernel_line, storm_line
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.flow import Pipeline
from tracer.pipeline.records import BY_SERVER_MAX, Clock
from tracer.pipeline.replay import replay


def counts(collisions: int, rows: int = 1, **losses) -> dict:
    by = [{"netns": 4026531840, "family": "ipv4", "server_port": 12345 + i, "lingering_state": "CLOSE_WAIT",
           "collisions": collisions if i == 0 else 1, "syn_hits": collisions if i == 0 else 1} for i in range(rows)]
    return {"collisions": collisions, "syn_hits": collisions, "events_not_submitted": 0, "untracked": 0,
            "uncounted": 0, **losses, "by_server": by}


def run(kernel: dict, storm: bool = False) -> tuple[list[dict], bytes]:
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    out: list[dict] = []
    p = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", out.append, recorder=w)
    for ev in Collision().seed_sequence():
        p.feed(ev)
    if storm:
        p.storm(T0 + 2 * S, T0 + S, {"events_not_submitted": 7}, kernel)
    p.flush()
    p.finish("SIGINT", kernel=kernel)
    return out, buf.getvalue()


def test_the_summary_says_how_many_the_kernel_saw_that_were_never_reported():
    out, _ = run(counts(5, events_not_submitted=12))
    k = out[-1]["kernel"]
    assert out[-1]["collisions"] == 1
    assert k["collisions"] == 5 and k["reported"] == 1 and k["unreported"] == 4
    line = kernel_line(k)
    assert "counted 5 collision(s)" in line and "4 never reported" in line


def test_all_reported_says_none_missing():
    out, _ = run(counts(1))
    k = out[-1]["kernel"]
    assert k["unreported"] == 0 and "never reported" not in kernel_line(k)


def test_the_busiest_servers_are_listed_and_the_rest_counted():
    out, _ = run(counts(3, rows=BY_SERVER_MAX + 5))
    k = out[-1]["kernel"]
    assert len(k["by_server"]) == BY_SERVER_MAX and k["by_server_omitted"] == 5


def test_a_storm_record_is_a_sentence_and_replays(tmp_path):
    out, raw = run(counts(9), storm=True)
    [storm] = [r for r in out if r["type"] == "storm"]
    assert storm["lost"] == {"events_not_submitted": 7} and storm["seconds"] == 1.0
    assert storm["kernel"]["collisions"] == 9
    line = storm_line(storm)
    assert "7 events the perf buffer refused" in line and "counted 9 collision(s)" in line
    assert "{" not in line and "True" not in line
    path = tmp_path / "storm.rec"
    path.write_bytes(raw)
    again: list[dict] = []
    replay(str(path), again.append)
    assert [r for r in again if r["type"] == "storm"] == [storm]
    assert again[-1]["kernel"] == out[-1]["kernel"]


def test_metrics_carry_the_kernel_counts():
    from prometheus_client import generate_latest

    from tracer.output.metrics import Metrics

    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Metrics(f"127.0.0.1:{port}", snapshot=lambda: None)
    try:
        m.kernel(counts(4, rows=2, events_not_submitted=3))
        text = generate_latest(m.registry).decode()
    finally:
        m.close()
    assert 'tcpcollide_kernel_collisions_total{lingering_state="CLOSE_WAIT",server_port="12345"} 4.0' in text
    assert "tcpcollide_events_not_submitted_total 3.0" in text


def test_the_state_hooks_skipped_runs_that_its_twin_ran_are_not_lost(monkeypatch):
    """(Synthetic program statistics.) The kernel skipped the set_state
    program 10 times and its twin ran 7 of them (TC_STAT_STATE_COVERED): 3
    state changes are lost; the twin's own skips are not counted (the first
    program ran for those), nor are skips of programs not given."""
    from tracer.kernel import bpfsys

    misses = {3: 0, 4: 0, 5: 0}  # fd -> recursion_misses: 3 the state hook, 4 another hook, 5 the twin
    covered = [0]
    monkeypatch.setattr(bpfsys, "prog_info", lambda fd: {"recursion_misses": misses[fd]})
    runs = bpfsys.SkippedRuns([3, 4], [3], lambda: covered[0])
    misses.update({3: 10, 4: 2, 5: 40})
    covered[0] = 7
    assert runs.new() == (3, 2) and runs.total == 5
    covered[0] = 10  # read behind the misses it covers: a loss said that was not, never the reverse
    assert runs.new() == (0, 0)
