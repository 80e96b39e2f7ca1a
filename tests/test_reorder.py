"""Unit tests for tracer.pipeline.reorder.Reorderer (putting per-CPU streams back in
kernel-timestamp order).

Synthetic streams only (Events built by tests/synthetic.py with chosen
timestamps and CPUs); the recorded fixtures go through the Reorderer in
tests/test_correlator.py (test_recorded_stream_out_of_order_*).
"""

from __future__ import annotations

import dataclasses
import random

from tests.synthetic import MS, T0, Collision
from tracer.pipeline.reorder import Reorderer

DELAY = 100 * MS


def ev(ts: int, cpu: int = 0, port: int = 39836):
    e = Collision(client_port=port).client_established(ts)
    return dataclasses.replace(e, cpu=cpu)


def stamps(events) -> list[int]:
    return [e.ts_ns for e in events]


def test_releases_in_timestamp_order():
    r = Reorderer(DELAY)
    offsets = [5, 1, 4, 2, 3, 9, 0, 7, 8, 6]
    for i, off in enumerate(offsets):
        r.push(ev(T0 + off * MS, cpu=i % 3))
    out = r.pop_ready(T0 + 9 * MS + DELAY)
    assert stamps(out) == [T0 + k * MS for k in range(10)]
    assert len(r) == 0
    assert r.late == 0


def test_interleaved_cpu_rings_come_out_merged():
    # two per-CPU rings, each in order, read one ring at a time
    cpu0 = [ev(T0 + k * MS, cpu=0) for k in range(0, 20, 2)]
    cpu1 = [ev(T0 + k * MS, cpu=1) for k in range(1, 20, 2)]
    r = Reorderer(DELAY)
    for e in cpu1 + cpu0:
        r.push(e)
    out = r.pop_ready(T0 + 19 * MS + DELAY)
    assert stamps(out) == [T0 + k * MS for k in range(20)]
    assert [e.cpu for e in out] == [k % 2 for k in range(20)]


def test_holds_events_younger_than_delay():
    r = Reorderer(DELAY)
    r.push(ev(T0))
    r.push(ev(T0 + 50 * MS))
    assert r.pop_ready(T0) == []  # nothing is old enough yet
    assert r.pop_ready(T0 + DELAY - 1) == []
    assert len(r) == 2
    out = r.pop_ready(T0 + DELAY + 10 * MS)
    assert stamps(out) == [T0]
    assert len(r) == 1
    assert r.pop_ready(T0 + 50 * MS + DELAY - 1) == []
    assert stamps(r.pop_ready(T0 + 50 * MS + DELAY + 1)) == [T0 + 50 * MS]
    assert len(r) == 0


def test_zero_delay_releases_everything_up_to_now():
    r = Reorderer(0)
    r.push(ev(T0 + 2))
    r.push(ev(T0 + 1))
    r.push(ev(T0 + 3))
    assert stamps(r.pop_ready(T0 + 2)) == [T0 + 1, T0 + 2]
    assert stamps(r.pop_ready(T0 + 3)) == [T0 + 3]


def test_equal_timestamps_keep_arrival_order():
    # Events are not orderable: ties must be broken without comparing them
    r = Reorderer(DELAY)
    same = [ev(T0, port=p) for p in (40001, 40002, 40003)]
    for e in same:
        r.push(e)
    out = r.pop_ready(T0 + DELAY)
    assert [e.lport for e in out] == [40001, 40002, 40003]


def test_drain_returns_everything_sorted():
    rng = random.Random(7)
    times = [T0 + rng.randrange(10**9) for _ in range(200)]
    r = Reorderer(DELAY)
    for t in times:
        r.push(ev(t))
    assert r.pop_ready(T0) == []  # all too young
    out = r.drain()
    assert stamps(out) == sorted(times)
    assert len(r) == 0
    assert r.drain() == []
    assert r.released_ns == max(times)


def test_late_counts_events_older_than_a_released_one():
    r = Reorderer(DELAY)
    r.push(ev(T0 + 10 * MS))
    assert stamps(r.pop_ready(T0 + 10 * MS + DELAY)) == [T0 + 10 * MS]
    assert r.released_ns == T0 + 10 * MS
    assert r.late == 0
    r.push(ev(T0 + 5 * MS))  # older than something already released
    assert r.late == 1
    r.push(ev(T0 + 10 * MS))  # same age as the newest released: not late
    r.push(ev(T0 + 20 * MS))
    assert r.late == 1
    r.push(ev(T0 + 1 * MS))
    assert r.late == 2
    # late events are still delivered, not dropped
    assert stamps(r.drain()) == [T0 + 1 * MS, T0 + 5 * MS, T0 + 10 * MS, T0 + 20 * MS]


def test_no_late_events_when_delay_covers_the_skew():
    # per-CPU read-out skew smaller than the delay: nothing is late, order is exact
    rng = random.Random(3)
    events = [ev(T0 + k * 37_000, cpu=rng.randrange(4)) for k in range(500)]
    arrivals = sorted((e.ts_ns + rng.randrange(DELAY), i, e) for i, e in enumerate(events))
    assert [e for _, _, e in arrivals] != events  # really out of order
    r = Reorderer(DELAY)
    out = []
    for now, _, e in arrivals:
        r.push(e)
        out += r.pop_ready(now)
    out += r.drain()
    assert r.late == 0
    assert stamps(out) == sorted(stamps(events))
