"""Fuzzing (hypothesis), no root: the correlator fed random and malformed
event streams, and the replay reader fed random and mutated recordings. No
exception may escape, and memory stays bounded (open incidents, raw events
per incident, remembered repeats)."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.synthetic import STATES, T0, Collision, addr
from tracer.pipeline import recording
from tracer.pipeline.correlator import MAX_RAW_EVENTS, Correlator
from tracer.pipeline.events import EVENT_TYPES, FIELDS, HOOKS, NAMED_FIELDS, Event, encode
from tracer.pipeline.replay import ReplayError, replay

SCALAR_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ports = st.sampled_from([12345, 39836, 80, 1, 65535])
ips = st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "fd00::2"])
states = st.sampled_from(sorted(STATES) + [0, 99, 255])


@st.composite
def events(draw):
    # every scalar field of the header: any value its C type holds ...
    kw = {name: draw(st.integers(0, 2 ** (8 * SCALAR_SIZES[ctype]) - 1))
          for name, ctype, n in FIELDS if not n and name not in NAMED_FIELDS}
    kw.update({name: draw(st.text(max_size=n - 1)) for name, ctype, n in FIELDS if ctype == "char"})
    # ... then the ones incidents are keyed and timed on, within the streams' reach
    ip_l, ip_r = draw(ips), draw(ips)
    family = 10 if ":" in ip_l else 2
    kw.update(
        ts_ns=T0 + draw(st.integers(0, 20_000_000_000)), type=draw(st.sampled_from(sorted(EVENT_TYPES.values()))),
        hook=draw(st.sampled_from(sorted(HOOKS.values()))), cpu=draw(st.integers(0, 3)),
        netns=draw(st.sampled_from([1, 2])), family=family, laddr=addr(ip_l if family == 2 or ":" in ip_l else "::1"),
        lport=draw(ports), raddr=addr(ip_r if (":" in ip_r) == (family == 10) else ip_l), rport=draw(ports),
        oldstate=draw(states), newstate=draw(states), skaddr=draw(st.sampled_from([0, 0x1000, 0x2000, 0x3000])),
        flags=draw(st.integers(0, 15)), syn_age_ns=draw(st.integers(0, 2**40)),
        observed_age_ns=draw(st.integers(0, 2**40)),
        sk_ino=draw(st.integers(0, 5)), conn_pid=draw(st.integers(0, 9)))
    return Event(**kw)


@SETTINGS
@given(st.lists(events(), max_size=200), st.booleans())
def test_correlator_takes_any_stream(stream, sort):
    if sort:
        stream = sorted(stream, key=lambda e: e.ts_ns)
    c = Correlator(STATES, hz=250, max_open=8)
    out = []
    for ev in stream:
        out += c.feed(ev)
        assert len(c.open) <= 8
        assert all(len(i.events) <= MAX_RAW_EVENTS for i in c.open.values())
    c.lost(3)
    out += c.tick(T0 + 10**12)
    out += c.flush()
    assert not c.open
    assert all(i.outcome in ("recovered", "stuck", "gave_up", "pending") for i in out)
    assert len(c.recent_sockets) <= 1024 and len(c.recent_tuples) <= 1024


def seed_recording() -> bytes:
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "k", "backend": "tracepoint", "clock_offset_ns": 0, "hz": 250,
                               "tcp_states": {str(k): v for k, v in STATES.items()}})
    for ev in Collision().seed_sequence():
        w.event(encode(ev))
    w.flush()
    w.context(1, {"owners": [], "listener": None})
    w.end({"stopped_by": "SIGINT"})
    return buf.getvalue()


SEED = seed_recording()


@SETTINGS
@given(st.data())
def test_replay_reader_takes_any_damage(tmp_path_factory, data):
    blob = bytearray(SEED)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.mktemp("fuzz") / "r.rec"
    path.write_bytes(bytes(blob))
    out = []
    try:
        replay(str(path), out.append)
    except ReplayError as e:
        assert "byte offset" in str(e) or "cannot read" in str(e)
    if out:
        assert out[-1]["type"] == "summary"


@SETTINGS
@given(st.binary(max_size=600))
def test_replay_reader_takes_random_bytes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "r.rec"
    path.write_bytes(recording.MAGIC + blob if blob[:1] == b"{" else blob)
    try:
        replay(str(path), lambda rec: None)
    except ReplayError as e:
        assert "byte offset" in str(e)
