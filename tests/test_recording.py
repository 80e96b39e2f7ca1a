"""Unit tests of recordings and replay, no root: synthetic event streams
(tests/synthetic.py) written with the real Writer, replayed, and damaged in
several ways. A damaged recording is replayed up to the damage and the error
names the byte offset."""

from __future__ import annotations

import io
import json
import struct

import pytest

from tests.synthetic import HZ, MS, S, STATES, T0, Collision
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.events import encode
from tracer.pipeline.flow import NoHost, Pipeline
from tracer.pipeline.replay import ReplayError, replay
from tracer.pipeline.records import Clock

CONTEXT = {"owners": [{"pid": 7, "comm": "leaky", "fd": 4}], "listener": None}


class Host(NoHost):
    """What the live run's host said of each incident (the same for all)."""

    def __init__(self, contexts: bool):
        self.contexts = contexts

    def context(self, inc):
        return CONTEXT if self.contexts else None


def make(path, events, contexts=True) -> list[dict]:
    """Drive the live run's Pipeline (ordered events, a recorder, a host
    giving CONTEXT) and write its recording; return the records it wrote."""
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, host=Host(contexts),
                        recorder=w)
    for ev in events:
        pipeline.feed(ev)
    pipeline.flush()
    pipeline.finish("SIGINT")
    path.write_bytes(buf.getvalue())
    return [r for r in printed if r["type"] == "collision"]


def two_collisions():
    a = Collision()
    b = Collision(client_port=40000, closewait_sk=a.closewait_sk + 0x1000, client_sk=a.client_sk + 0x1000)
    return a.seed_sequence() + b.seed_sequence(t0=T0 + 2 * S)


def run(path):
    out = []
    try:
        replay(str(path), out.append)
        err = None
    except ReplayError as e:
        err = str(e)
    return [r for r in out if r["type"] == "collision"], out[-1], err


def test_replay_equals_what_the_live_session_printed(tmp_path):
    path = tmp_path / "r.rec"
    printed = make(path, two_collisions())
    got, summary, err = run(path)
    assert err is None
    assert got == printed and len(got) == 2
    assert got[0]["closewait_socket"]["owners"] == CONTEXT["owners"]
    assert summary["type"] == "summary" and summary["stopped_by"] == "SIGINT" and summary["collisions"] == 2


def test_an_open_incident_is_flushed_like_the_live_run(tmp_path):
    path = tmp_path / "r.rec"
    events = Collision().seed_sequence()[:4]  # never established: ended by the flush at Ctrl-C
    printed = make(path, events)
    got, _, err = run(path)
    assert err is None and got == printed and got[0]["ended_by"] == "flush"


def damage(path, how):
    data = bytearray(path.read_bytes())
    start = data.index(b"\n", len(recording.MAGIC)) + 1  # first frame
    if how == "magic":
        data[0:5] = b"XXXXX"
    elif how == "header_json":
        data[len(recording.MAGIC)] = ord("!")
    elif how == "format":
        head = json.loads(data[len(recording.MAGIC):start])
        head["format"] = 99
        data[len(recording.MAGIC):start] = json.dumps(head).encode() + b"\n"
    elif how == "truncated":
        del data[-5:]
    elif how == "kind":
        data[second_frame(data, start)] = 99
    elif how == "length":
        off = second_frame(data, start)
        data[off + 1:off + 5] = struct.pack("<I", 1 << 30)
    elif how == "event_size":
        off = second_frame(data, start)
        data[off + 1:off + 5] = struct.pack("<I", 10)
    path.write_bytes(bytes(data))
    return start


def second_frame(data, start):
    _, length = struct.unpack_from("<BI", data, start)
    return start + 5 + length


@pytest.mark.parametrize("how", ["magic", "header_json", "format"])
def test_a_bad_header_is_one_clear_error(tmp_path, how):
    path = tmp_path / "r.rec"
    make(path, two_collisions())
    damage(path, how)
    with pytest.raises(ReplayError, match="byte offset"):
        replay(str(path), lambda rec: None)


@pytest.mark.parametrize("how", ["kind", "length", "event_size"])
def test_damage_after_the_first_frame_names_its_offset(tmp_path, how):
    path = tmp_path / "r.rec"
    make(path, two_collisions())
    start = damage(path, how)
    got, summary, err = run(path)
    off = second_frame(path.read_bytes(), start)
    assert err is not None and f"byte offset {off}" in err and "everything before it was replayed" in err
    assert summary["type"] == "summary" and summary["events"] == 1  # the first event was analysed


def test_a_truncated_recording_keeps_what_came_before(tmp_path):
    path = tmp_path / "r.rec"
    printed = make(path, two_collisions())
    damage(path, "truncated")
    got, summary, err = run(path)
    assert err is not None and "truncated" in err
    assert got == printed  # the cut hit the end frame: every incident was already there
    assert summary["stopped_by"] == "recording cut short"


def test_a_recording_cut_inside_an_event_still_reports_the_first_incident(tmp_path):
    path = tmp_path / "r.rec"
    printed = make(path, two_collisions())
    data = path.read_bytes()
    first_b_event = data.index(encode(two_collisions()[8]))
    path.write_bytes(data[:first_b_event + 20])
    got, _, err = run(path)
    assert err is not None and "truncated event frame" in err
    assert got[0] == printed[0]


def test_replay_of_client_and_both_views_with_all_events(tmp_path):
    """Synthetic: recordings carry the client's event type; a replay with
    --all-events streams every event, then the same collisions."""
    a = Collision(server_ip="10.0.0.1", client_ip="10.0.0.2")
    b = Collision(client_port=40000, closewait_sk=a.closewait_sk + 0x1000, client_sk=a.client_sk + 0x1000)
    events = a.client_sequence() + b.both_sequence(t0=T0 + 2 * S)
    path = tmp_path / "r.rec"
    printed = make(path, events)
    assert [r["view"] for r in printed] == ["client", "both"]
    out: list[dict] = []
    replay(str(path), out.append, all_events=True)
    streamed = [r for r in out if r["type"] == "event"]
    assert [r["ts_ns"] for r in streamed] == [e.ts_ns for e in events]
    assert streamed[0]["event"] == "client_challenged" and streamed[0]["backend"] == "tracepoint"
    assert streamed[0]["oldstate_name"] == "SYN_SENT" and streamed[0]["local"] == a.client
    assert [r for r in out if r["type"] == "collision"] == printed


def test_state_hook_gaps_replay_like_the_live_run(tmp_path):
    """Synthetic stream: the state hook came on 20 ms after the SYN (the
    retry's establishment went unseen). The recording keeps when it came on
    and off, so the replay marks the incident incomplete as the live run did;
    a damaged state_hook frame is named."""
    a = Collision()
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0})
    w.state_hook(False, T0 - S)
    for ev in a.seed_sequence():
        if ev.type == "state" and ev.ts_ns < T0 + 20 * MS:
            continue
        w.event(encode(ev))
    w.state_hook(True, T0 + 20 * MS)
    w.flush()
    w.end({"stopped_by": "SIGINT", "state_hook": {"attaches": 1, "slowest_ms": 21.0, "kept_attached": None}})
    path = tmp_path / "gap.rec"
    path.write_bytes(buf.getvalue())
    [inc], summary, err = run(path)
    assert err is None and inc["incomplete"] is True and inc["outcome"] == "pending"
    assert summary["state_hook"]["attaches"] == 1
    bad = buf.getvalue().replace(b'"attached":false', b'"attached":0')
    path.write_bytes(bad)
    _, _, err = run(path)
    assert err is not None and "corrupt state_hook frame" in err


def test_a_live_stream_out_of_order_replays_to_the_same_records(tmp_path):
    """Synthetic stream pushed as a perf buffer delivers it (out of order
    across CPUs), pumped by a clock, one incident ended by the clock (never
    established: the timeout): the live Pipeline's records, and its
    recording's replay, are the same."""
    a, b = Collision(), Collision(client_port=40000, closewait_sk=0xAAA000, client_sk=0xBBB000)
    stuck = [e for e in b.seed_sequence(t0=T0 + 10 * MS) if e.type in ("syn_challenged", "send_reset")]
    events = sorted(a.seed_sequence() + stuck, key=lambda e: e.ts_ns)
    delivered = events[1::2] + events[0::2]  # two CPUs' buffers, read one after the other
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings(timeout_ns=S).header()})
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ, Settings(timeout_ns=S)), Clock(0), "tracepoint", printed.append,
                        host=Host(True), recorder=w, reorder_delay_ns=100 * MS)
    for ev in delivered:
        pipeline.push(ev)
    for now in range(T0, T0 + 3 * S, 50 * MS):
        pipeline.pump(now)
    pipeline.flush()
    pipeline.finish("SIGINT")
    live = [r for r in printed if r["type"] == "collision"]
    assert sorted(r["outcome"] for r in live) == ["pending", "recovered"]
    path = tmp_path / "live.rec"
    path.write_bytes(buf.getvalue())
    got, summary, err = run(path)
    assert err is None and got == live
    assert summary["collisions"] == 2 and summary["events"] == len(events)


def test_an_establishment_confirmed_from_the_socket_list_replays_the_same(tmp_path):
    """Synthetic stream: the state hook came back too late, and the live
    run's host found the connection established in the socket list as the
    incident ended. The recording keeps what the host said, so the replay
    reports the same recovered_unseen incident."""
    connection = {"server": ["ESTABLISHED"], "client": None, "at_ns": T0 + 3 * S}

    class Late(NoHost):
        def context(self, inc):
            return {"owners": [], "listener": None, "connection": connection}

    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, host=Late(), recorder=w)
    pipeline.state_hook(False, T0 - S)
    pipeline.state_hook(True, T0 + 2 * S)
    for ev in Collision().seed_sequence():
        if ev.type != "state":
            pipeline.feed(ev)
    pipeline.flush()
    pipeline.finish("SIGTERM")
    [live] = [r for r in printed if r["type"] == "collision"]
    assert live["outcome_detail"] == "recovered_unseen" and live["penalty_ms"] is None
    path = tmp_path / "late.rec"
    path.write_bytes(buf.getvalue())
    got, summary, err = run(path)
    assert err is None and got == [live]


def test_skipped_runs_replay_like_the_live_run(tmp_path):
    """Synthetic stream: the live run was told of skipped BPF runs while a
    collision was open; the recording keeps it (a skipped frame), so the
    replay marks the same incident."""
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, recorder=w)
    events = Collision().seed_sequence()
    pipeline.feed(events[0])
    pipeline.skipped(3)
    for ev in events[1:]:
        pipeline.feed(ev)
    pipeline.flush()
    pipeline.finish("SIGINT")
    [live] = [r for r in printed if r["type"] == "collision"]
    assert live["incomplete_reasons"] == ["runs_skipped"]
    path = tmp_path / "skip.rec"
    path.write_bytes(buf.getvalue())
    got, summary, err = run(path)
    assert err is None and got == [live] and summary["skipped_runs"] == 3


class Slow(NoHost):
    """A live host whose lookups for the first incident are not done until
    `done` (as an owner scan spaced out in a storm)."""

    def __init__(self):
        self.done = False

    def waiting(self, inc):
        return inc.id == 1 and not self.done

    def context(self, inc):
        return {"owners": [{"pid": 100 + inc.id, "comm": "leaky", "fd": 4}], "listener": None}


def test_reports_wait_for_the_hosts_lookups_in_order_and_replay_the_same(tmp_path):
    """Synthetic stream: the first incident's report waits for its host
    lookups; the second, ended meanwhile, is reported after it, not before.
    The replay waits the same way and writes the same records."""
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()})
    printed: list[dict] = []
    host = Slow()
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, host=host, recorder=w)
    for ev in two_collisions():
        pipeline.feed(ev)
    assert printed == [] and pipeline.held == 2
    host.done = True
    pipeline.release()
    assert [r["id"] for r in printed] == [1, 2] and pipeline.held == 0
    assert [r["closewait_socket"]["owners"][0]["pid"] for r in printed] == [101, 102]
    pipeline.flush()
    pipeline.finish("SIGINT")
    path = tmp_path / "slow.rec"
    path.write_bytes(buf.getvalue())
    got, summary, err = run(path)
    live = [r for r in printed if r["type"] == "collision"]
    assert err is None and got == live and summary["collisions"] == 2


def test_the_end_reports_what_still_waits():
    """Synthetic stream: lookups that never finish do not keep a report back
    past the end of the run."""
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, host=Slow())
    for ev in two_collisions():
        pipeline.feed(ev)
    assert printed == []
    pipeline.flush()
    assert [r["id"] for r in printed] == [1, 2]


class Full(io.BytesIO):
    """A file on a disk that fills up after `room` bytes (as ENOSPC)."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(data)

    def fileno(self):
        raise OSError("no descriptor")


def test_a_full_disk_stops_the_recording_and_nothing_else(tmp_path):
    """Synthetic stream: the recording's disk fills during the second
    collision. The live run goes on and reports both; the writer is told
    once, says why and stops writing; the file replays up to there."""
    told = []
    f = Full(room=1200)
    w = recording.Writer(f, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                             STATES.items()}, "hz": HZ, "clock_offset_ns": 0, **Settings().header()}, on_stop=told.append)
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(0), "tracepoint", printed.append, host=Host(True), recorder=w)
    for ev in two_collisions():
        pipeline.feed(ev)
    pipeline.flush()
    summary = pipeline.finish("SIGINT", recording={"path": "r.rec"})
    assert [r["id"] for r in printed if r["type"] == "collision"] == [1, 2]
    assert told == [w] and w.stopped == "No space left on device"
    assert summary["recording"] == {"path": "r.rec", "stopped": "No space left on device", "stopped_at_bytes": None}
    path = tmp_path / "full.rec"
    path.write_bytes(f.getvalue())
    got, end, err = run(path)
    assert len(f.getvalue()) <= 1200 and err is None and end["stopped_by"] == "recording cut short"
    assert got and all(r["incomplete_reasons"] == ["recording_cut"] for r in got)  # never claimed pending
