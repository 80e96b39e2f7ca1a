"""Unit tests of the kernel-side tracking's bookkeeping (tracer/kernel/tracking.py)
and of what becomes of an evicted collision (the correlator, a recording and
its replay), without root: a dict stands in for map `tracked` (synthetic
entries), and the event streams are synthetic (tests/synthetic.py)."""

from __future__ import annotations

import ctypes
import io
import socket
import time

from tests.synthetic import HZ, STATES, Collision
from tracer.kernel.tracking import Tracking
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.flow import Pipeline
from tracer.pipeline.records import Clock
from tracer.pipeline.replay import replay


class Key(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_ubyte * 16), ("caddr", ctypes.c_ubyte * 16), ("sport", ctypes.c_uint16),
                ("cport", ctypes.c_uint16), ("family", ctypes.c_uint16)]


class Track(ctypes.Structure):
    _fields_ = [("first_ns", ctypes.c_uint64), ("skaddr", ctypes.c_uint64)]


class FakeMap(dict):
    """map `tracked` as a dict of (tuple key) -> (ctypes key, entry)."""

    Key = Key

    def add(self, cport: int, first_ns: int | None = None) -> tuple:
        k = Key(family=2, sport=12345, cport=cport)
        k.saddr[:4] = k.caddr[:4] = list(socket.inet_aton("127.0.0.1"))
        self[(2, bytes(k.saddr)[:4], 12345, bytes(k.caddr)[:4], cport)] = (k, Track(first_ns or time.monotonic_ns(), 1))
        return Tracking._key_of(k)

    def items(self):
        return [(k, tr) for k, tr in self.values()]

    def keys(self):
        return [k for k, _ in self.values()]

    def __getitem__(self, key):
        return super().__getitem__(Tracking._key_of(key))[1]

    def __delitem__(self, key):
        super().__delitem__(Tracking._key_of(key))


class FakeBPF(dict):
    def __init__(self):
        super().__init__(tracked=FakeMap(), tracking=None)


def test_evictions_are_what_was_added_and_neither_deleted_nor_left():
    bpf = FakeBPF()
    m = bpf["tracked"]
    added = [0]
    t = Tracking(bpf, lambda: added[0])
    keys = [m.add(port) for port in range(40000, 40010)]
    added[0] = 10
    assert t.sweep(set(keys), force=True) == [] and t.evicted == 0
    # the map, full, evicts three entries of open incidents to make room for three new ones
    for k in keys[:3]:
        dict.__delitem__(m, k)  # the kernel's eviction: behind user space's back
    new = [m.add(port) for port in range(41000, 41003)]
    added[0] = 13
    gone = t.sweep(set(keys) | set(new), force=True)
    assert t.evicted == 3 and sorted(gone) == sorted(keys[:3])
    assert t.counts()["tracked_evicted"] == 3
    # an ended incident deleted by user space is not an eviction
    class Inc:  # noqa: D401 - the fields untrack() reads
        key, first_ns, last_ns = keys[5], 0, time.monotonic_ns()
    Inc.keys = (Inc.key,)
    t.untrack(Inc)
    assert t.sweep(set(keys[3:]) - {keys[5]} | set(new), force=True) == [] and t.evicted == 3


def test_stale_entries_swept_are_not_evictions():
    bpf = FakeBPF()
    m = bpf["tracked"]
    added = [0]
    t = Tracking(bpf, lambda: added[0])
    m.add(40000, first_ns=time.monotonic_ns() - 10 * 10**9)  # no incident open on it: stale
    added[0] = 1
    assert t.sweep(set(), force=True) == []
    assert t.swept == 1 and t.evicted == 0 and t.entries == 0
    assert t.sweep(set(), force=True) == [] and t.evicted == 0


def test_entries_there_before_counting_are_not_evictions():
    bpf = FakeBPF()
    bpf["tracked"].add(40000)
    t = Tracking(bpf, lambda: 0)
    assert t.sweep(set(), force=True) == [] and t.evicted == 0


def pipeline_with_eviction() -> tuple[list[dict], bytes]:
    """The seed's collision whose entry the map evicts after its RST: the
    retry and the new connection are never streamed."""
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    out: list[dict] = []
    p = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", out.append, recorder=w)
    seq = Collision().seed_sequence()[:4]  # SYN, RST sent, RST received, CLOSE_WAIT -> CLOSE
    for ev in seq:
        p.feed(ev)
    [key] = p.correlator.open.keys()
    p.evicted([key])
    p.flush()
    p.finish("SIGINT")
    return out, buf.getvalue()


def test_an_evicted_collision_is_marked_and_replays_the_same(tmp_path):
    out, rec = pipeline_with_eviction()
    [live] = [r for r in out if r["type"] == "collision"]
    assert live["incomplete"] is True and "tracking_evicted" in live["incomplete_reasons"]
    assert "kernel-side tracking" in live["explanation"]
    path = tmp_path / "evicted.rec"
    path.write_bytes(rec)
    printed: list[dict] = []
    replay(str(path), printed.append)
    assert [r for r in printed if r["type"] == "collision"] == [live]
