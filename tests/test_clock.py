"""Durations never depend on the wall clock (issue: incidents spanning a
wall-clock step): synthetic event streams (tests/synthetic.py) through the
real pipeline, with the wall clock stepped an hour forward, then back, in the
middle of an incident; and the rule that makes it so, checked on the code."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.synthetic import HZ, STATES, Collision
from tracer.pipeline.correlator import Correlator
from tracer.pipeline.flow import Pipeline
from tracer.pipeline.records import Clock

REPO = Path(__file__).resolve().parent.parent


def reports(step_at: int | None, monkeypatch) -> list[dict]:
    """The seed's collision, the wall clock stepped by an hour after event `step_at`."""
    out: list[dict] = []
    clock = Clock.now()  # taken once, at the start, as a session does
    p = Pipeline(Correlator(STATES, HZ), clock, "tracepoint", out.append)
    real_time, real_ns = time.time, time.time_ns
    for i, ev in enumerate(Collision().seed_sequence()):
        p.feed(ev)
        if i == step_at:
            monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
            monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 3600 * 10**9)
    p.flush()
    monkeypatch.setattr(time, "time", real_time)
    monkeypatch.setattr(time, "time_ns", real_ns)
    return [r for r in out if r["type"] == "collision"]


def test_a_wall_clock_step_in_the_middle_of_an_incident_changes_no_duration(monkeypatch):
    [calm] = reports(None, monkeypatch)
    [stepped] = reports(2, monkeypatch)  # after the SYN, the challenge and the RST
    assert stepped["penalty_ms"] == calm["penalty_ms"] and stepped["penalty_ms"] is not None
    assert stepped["steps"] == calm["steps"]
    assert stepped["closewait_age_s"] == calm["closewait_age_s"]
    # the report's wall-clock time is the kernel's monotonic time plus the offset taken at start
    assert stepped["time"][:16] == calm["time"][:16]


def test_only_the_start_reads_the_wall_clock():
    """Every duration is kernel time (bpf_ktime_get_ns: CLOCK_MONOTONIC) or
    time.monotonic(); the wall clock is read once, by Clock.now() at the
    session's start, to print times of day. A new reading elsewhere in the
    tracing path would let a clock step into the numbers."""
    wall = re.compile(r"\btime\.time(_ns)?\(|datetime\.now\(|\bdt\.datetime\.now\(")
    found = []
    for path in [*(REPO / "tracer" / "pipeline").glob("*.py"), REPO / "tracer" / "session.py",
                 *(REPO / "tracer" / "kernel").glob("*.py")]:
        for line in path.read_text().splitlines():
            if wall.search(line):
                found.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert found == ["tracer/pipeline/records.py: return cls(time.time_ns() - time.monotonic_ns())"], found
