"""Unit tests of joining two hosts' recordings (tracer/pipeline/join.py), no
root: synthetic event streams (tests/synthetic.py) recorded with the real
Writer through the live run's Pipeline, as a server's host, a client's host
and one host seeing both ends would have recorded them. The live test with
real tracers on two namespaces is tests/test_join_live.py."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from tests.synthetic import HZ, MS, S, STATES, T0, Collision
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Settings
from tracer.pipeline.filters import Filters
from tracer.pipeline.flow import NoHost, Pipeline
from tracer.pipeline.join import estimate_shift, replay_recordings
from tracer.pipeline.records import Clock
from tracer.pipeline.replay import ReplayError, replay

SERVER_NS, CLIENT_NS = 4026532246, 4026532999
OWNERS = [{"pid": 7, "comm": "leaky", "fd": 4}]
CLIENT_PROCESS = {"pid": 9, "comm": "curl"}
SHIFT = 3_600 * S + 123_456  # the client's host's kernel clock is this far ahead
RTT = 36_000  # the challenge ACK's flight; the RST's takes 14 us


class EndHost(NoHost):
    """What each host's tracer found out: the server's the socket's owner,
    the client's the connecting process."""

    def __init__(self, server: bool, client: bool):
        self.server, self.client = server, client

    def context(self, inc):
        ctx = {"owners": OWNERS if self.server and inc.seen_server else [], "listener": None}
        if self.client and inc.seen_client:
            ctx["client_process"] = CLIENT_PROCESS
        return ctx


def record(path, events, host: EndHost, boot_id: str = "boot-1", offset: int = 0) -> list[dict]:
    buf = io.BytesIO()
    w = recording.Writer(buf, {"kernel": "test", "backend": "tracepoint", "tcp_states": {str(k): v for k, v in
                               STATES.items()}, "hz": HZ, "clock_offset_ns": offset, "boot_id": boot_id,
                               "host": path.stem, **Settings().header()})
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, HZ), Clock(offset), "tracepoint", printed.append, host=host, recorder=w)
    for ev in sorted(events, key=lambda e: e.ts_ns):
        pipeline.feed(ev)
    pipeline.flush()
    pipeline.finish("SIGINT")
    path.write_bytes(buf.getvalue())
    return [r for r in printed if r["type"] == "collision"]


def collisions(n: int = 2) -> list[Collision]:
    return [Collision(server_ip="10.0.0.1", client_ip="10.0.0.2", client_port=40000 + i, netns=SERVER_NS,
                      client_netns=CLIENT_NS, closewait_sk=0xFFFF888100000000 + i * 0x1000,
                      client_sk=0xFFFF888100000940 + i * 0x1000, snd_nxt=1000 + i, rcv_nxt=5000 + i) for i in range(n)]


def both_ends(c: Collision, t0: int) -> list:
    return c.both_sequence(t0)


def split(events) -> tuple[list, list]:
    server = [e for e in events if e.netns == SERVER_NS]
    client = [e for e in events if e.netns == CLIENT_NS]
    return server, client


def moved(events, by: int) -> list:
    return [dataclasses.replace(e, ts_ns=e.ts_ns + by, raw=b"") for e in events]


def three(tmp_path, shift: int = 0, client_boot: str = "boot-1", client_offset: int = 0):
    """(one host seeing both ends: its reports; server.rec; client.rec)."""
    events = [e for i, c in enumerate(collisions()) for e in both_ends(c, T0 + i * S)]
    both = record(tmp_path / "both.rec", events, EndHost(True, True))
    server, client = split(events)
    record(tmp_path / "server.rec", server, EndHost(True, False))
    record(tmp_path / "client.rec", moved(client, shift), EndHost(False, True), client_boot, client_offset)
    return both, tmp_path / "server.rec", tmp_path / "client.rec"


def joined(*paths, **kw) -> tuple[list[dict], dict]:
    out: list[dict] = []
    replay_recordings([str(p) for p in paths], out.append, **kw)
    return [r for r in out if r["type"] == "collision"], out[-1]


def plain(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("joined", "time")}


def test_one_boot_joins_into_what_one_host_seeing_both_ends_reports(tmp_path):
    both, server, client = three(tmp_path)
    assert [r["view"] for r in both] == ["both", "both"]
    reports, summary = joined(server, client)
    assert [plain(r) for r in reports] == [plain(r) for r in both]
    assert reports[0]["closewait_socket"]["owners"] == OWNERS and reports[0]["client_process"] == CLIENT_PROCESS
    assert reports[0]["joined"] == {"recordings": [str(server), str(client)], "clock_basis": "same_clock",
                                    "clock_shift_ms": 0.0, "clock_uncertainty_ms": 0.0}
    assert [(j["host"], j["clock"]["basis"], j["clock"]["matched"], j["collisions_alone"])
            for j in summary["joined"]] == [("server", "reference", 0, 2), ("client", "same_clock", 2, 2)]
    assert summary["collisions"] == 2 and summary["lost_events"] == 0


def test_another_hosts_clock_is_aligned_on_the_challenge_ack_exchange(tmp_path):
    both, server, client = three(tmp_path, shift=SHIFT, client_boot="boot-2", client_offset=-SHIFT + 5 * MS)
    reports, summary = joined(server, client)
    clock = summary["joined"][1]["clock"]
    assert clock["basis"] == "matched" and clock["matched"] == 2
    # server: challenge sent at t0, RST received at t0 + 50 us; client: challenge received at t0 + 36 us (its clock)
    assert clock["uncertainty_ms"] == 0.025
    assert abs(clock["shift_ms"] * MS + SHIFT) <= 25_000
    assert [r["view"] for r in reports] == ["both", "both"]
    for r, b in zip(reports, both):
        assert r["joined"]["clock_basis"] == "matched" and r["joined"]["clock_uncertainty_ms"] == 0.025
        assert {k: v for k, v in plain(r).items() if k not in ("steps", "penalty_ms")} == {
            k: v for k, v in plain(b).items() if k not in ("steps", "penalty_ms")}
        assert [s["step"] for s in r["steps"]] == [s["step"] for s in b["steps"]]
        for sr, sb in zip(r["steps"], b["steps"]):
            assert abs(sr["t_ms"] - sb["t_ms"]) <= 2 * 0.025 + 0.001, (sr, sb)
    # either recording first: the first one's clock is the reference
    again, summary = joined(client, server)
    assert summary["joined"][1]["clock"]["shift_ms"] == -clock["shift_ms"]
    assert [r["view"] for r in again] == ["both", "both"]


def test_with_no_collision_seen_at_both_ends_the_wall_clocks_align_them(tmp_path):
    a, b = collisions(2)
    server_events, _ = split(both_ends(a, T0))
    _, client_events = split(both_ends(b, T0 + S))
    record(tmp_path / "server.rec", server_events, EndHost(True, False))
    # the client's host: its kernel clock 1 h ahead, its wall clock right
    record(tmp_path / "client.rec", moved(client_events, SHIFT), EndHost(False, True), "boot-2", -SHIFT)
    reports, summary = joined(tmp_path / "server.rec", tmp_path / "client.rec")
    assert summary["joined"][1]["clock"] == {"basis": "wall_clock", "shift_ms": round(-SHIFT / MS, 3),
                                             "uncertainty_ms": None, "matched": 0}
    assert sorted(r["view"] for r in reports) == ["client", "server"]  # left as they were
    client_report = next(r for r in reports if r["view"] == "client")
    assert client_report["joined"]["clock_basis"] == "wall_clock"
    assert client_report["joined"]["clock_uncertainty_ms"] is None
    assert client_report["time"] == Clock(0).iso(T0 + S - 20_000)  # its first SYN, on the server's clock


def test_the_client_rst_step_is_the_same_whichever_ends_event_comes_first(tmp_path):
    """Two tracers stamp the two ends' events microseconds apart: the
    server's receipt of the RST may come before the client's send of it."""
    c = collisions(1)[0]
    normal = both_ends(c, T0)
    flipped = [dataclasses.replace(e, ts_ns=T0 + 60_000) if e.type == "client_challenged" else e for e in normal]
    first = record(tmp_path / "a.rec", normal, EndHost(True, True))[0]
    second = record(tmp_path / "b.rec", flipped, EndHost(True, True))[0]
    rst = [next(s for s in r["steps"] if s["step"] == "rst") for r in (first, second)]
    assert set(rst[0]) == set(rst[1]) == {"step", "t_ms", "seq", "in_window", "seen_at", "received_ms"}
    assert rst[1]["seen_at"] == "client" and rst[1]["t_ms"] == 0.06 and rst[1]["received_ms"] == 0.05


def test_the_replay_takes_the_live_filters(tmp_path):
    both, server, client = three(tmp_path)
    for filters in (Filters(port=1), Filters(family="ipv6"), Filters(netns=1)):
        reports, summary = joined(server, client, filters=filters)
        assert reports == [] and summary["kernel"] is None
    reports, _ = joined(server, client, filters=Filters(port=40001))
    assert [r["client"] for r in reports] == ["10.0.0.2:40001"]
    reports, summary = joined(server, client, filters=Filters(netns=SERVER_NS))  # the server's end only
    assert [r["view"] for r in reports] == ["server", "server"]
    assert summary["replay_of"]["filters"]["netns"] == SERVER_NS
    out: list[dict] = []
    replay(str(client), out.append, filters=Filters(family="ipv4"))
    assert [r["view"] for r in out if r["type"] == "collision"] == ["client", "client"]


def test_a_damaged_recording_in_a_join_is_named_after_the_rest_is_replayed(tmp_path):
    both, server, client = three(tmp_path)
    data = client.read_bytes()
    client.write_bytes(data[:-40])  # cut inside its last frames
    out: list[dict] = []
    with pytest.raises(ReplayError, match=f"^{client}: .* at byte offset"):
        replay_recordings([str(server), str(client)], out.append)
    assert out[-1]["type"] == "summary" and out[-1]["collisions"] == 2


def test_kernels_that_number_tcp_states_differently_are_not_joined(tmp_path):
    _, server, client = three(tmp_path)
    data = client.read_bytes().replace(b'"1":"ESTABLISHED"', b'"1":"SOMETHING"')
    client.write_bytes(data)
    with pytest.raises(ReplayError, match="number TCP states differently"):
        replay_recordings([str(server), str(client)], lambda rec: None)


def test_estimate_needs_the_same_tuple_and_the_same_numbers(tmp_path):
    """A challenge ACK with other numbers on the same tuple is another
    collision (the port reused again, or a middlebox): not a match."""
    c = collisions(1)[0]
    events = both_ends(c, T0)
    server, client = split(events)
    other = dataclasses.replace(c, snd_nxt=c.snd_nxt + 1)
    client = [other.client_challenged(e.ts_ns, syn_ts=T0 - 20_000) if e.type == "client_challenged" else e
              for e in client]

    def incidents(evs):
        corr = Correlator(STATES, HZ)
        out = []
        for ev in sorted(evs, key=lambda e: e.ts_ns):
            out += corr.feed(ev)
        return out + corr.flush()

    assert estimate_shift(incidents(server), incidents(client)) is None



def in_container(name: str) -> dict:
    return {"unit": None, "container": {"name": name, "id": "ab" * 32, "runtime": "podman"}, "pod": None}


class ContainerHost(NoHost):
    """The server's host named the socket's holder, in container `web`
    (or nothing: `named` False)."""

    def __init__(self, named: bool = True):
        self.named = named

    def context(self, inc):
        owners = [{"pid": 7, "comm": "leaky", "fd": 4, "workload": in_container("web")}] if self.named else []
        return {"owners": owners, "listener": None}


@pytest.mark.parametrize("join", [False, True])
def test_the_replay_takes_the_workload_filters_by_the_processes_recorded(tmp_path, join):
    """--container/--pod/--unit at replay, through the command line: a
    collision is kept when a process its host named runs in the workload;
    the others are counted as outside the selection, never silently gone."""
    from tests.test_cli import invoke  # noqa: PLC0415

    events = [e for i, c in enumerate(collisions()) for e in both_ends(c, T0 + i * S)]
    server, client = split(events)
    record(tmp_path / "server.rec", server[:len(server) // 2], ContainerHost())
    record(tmp_path / "later.rec", moved(server[len(server) // 2:], 0), ContainerHost(named=False))
    record(tmp_path / "client.rec", client, EndHost(False, True))
    recordings = [str(tmp_path / "server.rec")] + ([str(tmp_path / "client.rec")] if join else [])
    # joined: the client's second collision (seen by it alone, its process in no container) is not web's either
    for name, reported, outside in (("web", 1, {"not_selected": 1} if join else {}),
                                    ("db", 0, {"not_selected": 2 if join else 1})):
        r = invoke(["replay", "--json", "--container", name, *recordings])
        assert r.exit_code == 0, r.output
        records = [json.loads(line) for line in r.stdout.splitlines()]
        assert sum(1 for x in records if x["type"] == "collision") == reported, records
        assert records[-1]["outside_selection"] == outside and records[-1]["kernel"] is None
    r = invoke(["replay", "--json", "--container", "web", str(tmp_path / "later.rec")])
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert records[-1]["collisions"] == 0 and records[-1]["outside_selection"] == {"unattributed": 1}


def test_events_two_recordings_of_one_host_both_hold_are_fed_once(tmp_path):
    """Two tracers on one host whose filters overlap (one unfiltered, one
    on the server's namespace) stamped the same kernel events microseconds
    apart: joined, each event counts once, and the summary says how many
    were dropped as twins."""
    both, server, _ = three(tmp_path)
    events = [e for i, c in enumerate(collisions()) for e in both_ends(c, T0 + i * S)]
    server_events, _ = split(events)
    record(tmp_path / "server.rec", moved(server_events, 4_000), EndHost(True, False))
    reports, summary = joined(tmp_path / "both.rec", tmp_path / "server.rec")
    assert [plain(r) for r in reports] == [plain(r) for r in both]
    assert summary["joined_duplicates"] == len(server_events)
