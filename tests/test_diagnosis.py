"""Unit tests of the diagnosis layer, no root: outcomes and repeats on
synthetic event streams (tests/synthetic.py), the accept-queue arithmetic and
CLOSE_WAIT grouping on synthetic socket lists, the sock_diag message parser on
a hand-packed message, the owner cache with a fake /proc scan, and the
explanations' wording of each fix."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from tests.synthetic import MS, STATES, S, T0, Collision, correlate
from tracer.host import inventory, sockdiag
from tracer.pipeline.correlator import Correlator
from tracer.host.diagnosis import queue_for
from tracer.host.procfs import Owner, OwnerCache, socket_owners
from tracer.pipeline.records import Clock, collision_record, culprit_of

CLOCK = Clock(0)


run = correlate


# -- outcomes (synthetic streams) ---------------------------------------------------


def test_seed_recovers_fast():
    _, [inc] = run(Collision().seed_sequence())
    assert (inc.outcome, inc.outcome_detail, inc.stuck_reason) == ("recovered", "recovered_fast", None)
    assert "right after the RST" in collision_record(inc, CLOCK, "tracepoint")["explanation"]


def test_retry_after_a_full_rto_is_named():
    _, [inc] = run(Collision().seed_sequence(retry_after=1 * S))
    assert inc.outcome_detail == "recovered_after_rto"
    assert "retransmission timeout" in collision_record(inc, CLOCK, "tracepoint")["explanation"]


def knocking(col: Collision, passed: list[bool]) -> list:
    events = [col.syn_challenged(T0, passed=passed[0])]
    for i, p in enumerate(passed[1:], 1):
        t = T0 + (2 ** i - 1) * S
        events += [col.retransmit(t), col.syn_challenged(t + 20_000, passed=p)]
    return events


def test_stuck_with_challenge_acks_sent_and_no_rst_is_lost_on_the_path():
    col = Collision()
    c, [] = run(knocking(col, [True, True, True]), flush=False, timeout_ns=5 * S)
    [inc] = c.tick(T0 + 5 * S)
    assert (inc.outcome, inc.outcome_detail) == ("stuck", "stuck_challenge_ack_lost")
    rec = collision_record(inc, CLOCK, "tracepoint")
    assert rec["challenge_acks_sent"] == 3 and rec["challenge_acks_limited"] == 0
    assert rec["retransmissions"] == 2
    assert [s["step"] for s in rec["steps"]].count("challenge_ack") == 3  # each one reported
    assert "firewall or NAT" in rec["explanation"]


def test_stuck_with_challenge_acks_held_back_is_rate_limited():
    col = Collision()
    c, [] = run(knocking(col, [True, False, False]), flush=False, timeout_ns=5 * S)
    [inc] = c.tick(T0 + 5 * S)
    assert inc.outcome_detail == "stuck_rate_limited"
    rec = collision_record(inc, CLOCK, "tracepoint")
    assert rec["challenge_acks_limited"] == 2
    assert "tcp_invalid_ratelimit" in rec["explanation"]


def test_client_giving_up_ends_the_incident_at_once():
    col = Collision()
    events = knocking(col, [True, True]) + [col.client_ev("state", T0 + 2 * S, "SYN_SENT", "CLOSE")]
    _, [inc] = run(events, flush=False)
    assert (inc.outcome, inc.outcome_detail, inc.stuck_reason) == ("gave_up", "client_gave_up",
                                                                    "stuck_challenge_ack_lost")
    assert inc.ended_by == "complete" and inc.has("client_closed")
    assert "closed its connecting socket after 1 retransmission" in collision_record(inc, CLOCK, "x")["explanation"]


def test_server_application_closing_meanwhile_is_a_step():
    col = Collision()
    events = knocking(col, [True, True]) + [col.server_ev("state", T0 + 2 * S, "CLOSE_WAIT", "LAST_ACK")]
    _, [inc] = run(events)
    step = inc.step("server_closed")
    assert step is not None and step.detail == {"from_state": "CLOSE_WAIT", "to_state": "LAST_ACK"}
    assert "Meanwhile the server application closed" in collision_record(inc, CLOCK, "x")["explanation"]


def test_same_port_colliding_again_names_the_earlier_incident():
    first = Collision()
    second = Collision(closewait_sk=first.closewait_sk + 0x1000)
    c, out = run(first.seed_sequence() + second.seed_sequence(t0=T0 + 5 * S))
    assert [i.repeat_of for i in out] == [None, {"id": out[0].id, "same": "port"}]


def test_same_socket_colliding_again_after_the_client_gave_up():
    col = Collision()
    events = knocking(col, [True]) + [col.client_ev("state", T0 + S, "SYN_SENT", "CLOSE")]
    events += [col.syn_challenged(T0 + 10 * S)]
    _, out = run(events)
    assert [i.repeat_of for i in out] == [None, {"id": out[0].id, "same": "socket"}]


def test_another_tuples_socket_at_a_reused_address_is_not_the_same_socket():
    """A freed lingering socket's memory holds another socket later (TIME_WAIT
    sockets above all): the same address on another tuple is no repeat."""
    first = Collision()
    second = Collision(client_port=first.client_port + 1, closewait_sk=first.closewait_sk)
    _, out = run(first.seed_sequence() + second.seed_sequence(t0=T0 + 5 * S))
    assert [i.repeat_of for i in out] == [None, None]


def test_a_new_lingering_socket_on_an_open_tuple_supersedes_it():
    first = Collision()
    second = Collision(closewait_sk=first.closewait_sk + 0x1000)
    events = first.seed_sequence()[:6] + [second.syn_challenged(T0 + 50 * MS)]
    c, out = run(events, flush=False)
    assert [i.ended_by for i in out] == ["superseded"]
    assert out[0].outcome == "recovered"
    assert list(c.open.values())[0].repeat_of == {"id": out[0].id, "same": "port"}


def test_recent_incidents_are_bounded(monkeypatch):
    monkeypatch.setattr("tracer.pipeline.correlator.RECENT", 3)
    out = []
    c = Correlator(STATES, hz=250)
    for i in range(10):
        col = Collision(client_port=30000 + i, closewait_sk=0xFFFF888100000000 + i * 0x1000)
        for ev in col.seed_sequence(t0=T0 + i * S):
            out += c.feed(ev)
    out += c.flush()
    assert len(out) == 10
    assert len(c.recent_sockets) == 3 and len(c.recent_tuples) == 3


def test_ghost_is_a_never_accepted_socket_that_died():
    _, [inc] = run(Collision().seed_sequence())
    assert inc.closewait["inode"] is None and inc.ghost
    rec = collision_record(inc, CLOCK, "tracepoint", context={
        "owners": [], "listener": {"listener": "127.0.0.1:12345", "recv_q": 9, "limit": 8, "alive": 1,
                                   "ghosts": 8, "full": True}})
    assert rec["closewait_socket"]["ghost"] is True
    assert "ghost" in rec["explanation"] and "Its queue is full" in rec["explanation"]


def test_a_never_accepted_socket_blames_the_listeners_owner():
    """(Synthetic seed sequence.) No process holds a socket that was never
    accepted: the culprit is the process holding the listener, named in the
    explanation, the fix and the culprit line; without it the text says only
    the listener's address."""
    _, [inc] = run(Collision().seed_sequence())
    listener = {"listener": "127.0.0.1:12345", "recv_q": 2, "limit": 8, "alive": 1, "ghosts": 1, "full": False,
                "owners": [{"pid": 11637, "comm": "nc", "fd": 3}]}
    rec = collision_record(inc, CLOCK, "tracepoint", context={"owners": [], "listener": listener})
    assert rec["listener"]["owners"] == [{"pid": 11637, "comm": "nc", "fd": 3}]
    assert "listening on 127.0.0.1:12345 (the program nc (pid 11637), fd 3) does not call accept()" \
        in rec["explanation"]
    assert "(the program nc (pid 11637), fd 3) leaves connections in its accept queue" in rec["explanation"]
    assert culprit_of(rec) == "nc (pid 11637) not accepting on 127.0.0.1:12345"
    bare = collision_record(inc, CLOCK, "tracepoint", context={"owners": [], "listener": {**listener, "owners": []}})
    assert "listening on 127.0.0.1:12345 does not call accept()" in bare["explanation"]
    assert culprit_of(bare) == "not accepted on 127.0.0.1:12345"


def test_owner_named_in_the_fix():
    col = Collision()
    events = col.seed_sequence()
    events[0] = events[0].__class__(**{**events[0].__dict__, "sk_ino": 4242, "unread": 100})
    _, [inc] = run(events)
    rec = collision_record(inc, CLOCK, "tracepoint", context={
        "owners": [{"pid": 77, "comm": "leakysrv", "fd": 9}], "listener": None})
    assert rec["closewait_socket"]["owners"] == [{"pid": 77, "comm": "leakysrv", "fd": 9}]
    assert rec["closewait_socket"]["unread_bytes"] == 100 and rec["closewait_socket"]["ghost"] is False
    assert "Fix: the program leakysrv (pid 77) never closes fd 9" in rec["explanation"]
    assert "with 100 unread bytes" in rec["explanation"]


@pytest.mark.parametrize("state, words", [("LAST_ACK", "FIN was never acknowledged"),
                                          ("FIN_WAIT2", "tcp_fin_timeout"), ("CLOSING", "Both ends closed")])
def test_other_lingering_states_have_their_own_explanation(state, words):
    col = Collision()
    events = col.seed_sequence()
    events[0] = events[0].__class__(**{**events[0].__dict__, "oldstate": {v: k for k, v in STATES.items()}[state]})
    _, [inc] = run(events)
    rec = collision_record(inc, CLOCK, "tracepoint")
    assert rec["lingering_state"] == state
    assert words in rec["explanation"] and "never called close()" not in rec["explanation"]


# -- accept queues and CLOSE_WAIT groups (synthetic socket lists) -------------------


def sock(state, lport, rport=0, inode=0, recv_q=0, send_q=0, laddr="127.0.0.1", family="ipv4", netns=1,
         last_ack=None):
    raddr = "127.0.0.1" if family == "ipv4" else "::1"
    return sockdiag.Sock(netns, family, state, laddr, lport, raddr if rport else ("0.0.0.0" if family == "ipv4"
                         else "::"), rport, inode, recv_q, send_q, 0, last_ack)


def test_listener_queue_counts_ghosts():
    socks = [
        sock("LISTEN", 9090, recv_q=3, send_q=8, inode=10),
        sock("CLOSE_WAIT", 9090, 40001, recv_q=1),  # queued, alive
        sock("ESTABLISHED", 9090, 40002),  # queued, alive
        sock("ESTABLISHED", 9090, 40003, inode=11),  # accepted: not in the queue
        sock("CLOSE_WAIT", 9091, 40004),  # another port
    ]
    [q] = inventory.listener_queues(socks)
    assert (q["recv_q"], q["limit"], q["alive"], q["ghosts"], q["full"]) == (3, 8, 2, 1, False)
    assert q["alive_states"] == {"CLOSE_WAIT": 1, "ESTABLISHED": 1}


def test_children_go_to_the_exact_listener_before_the_wildcard():
    socks = [
        sock("LISTEN", 80, recv_q=1, send_q=4, laddr="0.0.0.0"),
        sock("LISTEN", 80, recv_q=1, send_q=4, laddr="10.0.0.1"),
        sock("ESTABLISHED", 80, 5000, laddr="10.0.0.1"),
    ]
    by = {q["listener"]: q for q in inventory.listener_queues(socks)}
    assert by["10.0.0.1:80"]["alive"] == 1 and by["10.0.0.1:80"]["ghosts"] == 0
    assert by["0.0.0.0:80"]["alive"] == 0 and by["0.0.0.0:80"]["ghosts"] == 1


def test_full_queue():
    [q] = inventory.listener_queues([sock("LISTEN", 80, recv_q=2, send_q=1)])
    assert q["full"] and q["ghosts"] == 2


def test_closewait_groups_by_process_and_port():
    socks = [
        sock("CLOSE_WAIT", 8080, 1, inode=100, recv_q=8, last_ack=5000),
        sock("CLOSE_WAIT", 8080, 2, inode=101, recv_q=1, last_ack=1000),
        sock("CLOSE_WAIT", 9090, 3, inode=0, recv_q=1, last_ack=2000),
        sock("ESTABLISHED", 8080, 4, inode=102),
    ]
    owners = {100: [Owner(7, "leaky", 5)], 101: [Owner(7, "leaky", 6)]}
    rec = inventory.build(socks, owners, namespaces=1)
    assert rec["closewait_total"] == 3
    leaky, orphan = rec["closewait"]
    assert (leaky["pid"], leaky["comm"], leaky["local"], leaky["count"]) == (7, "leaky", "127.0.0.1:8080", 2)
    assert (leaky["oldest_age_s"], leaky["newest_age_s"], leaky["unread_bytes"]) == (5.0, 1.0, 7)
    assert [s["fd"] for s in leaky["sockets"]] == [5, 6]
    assert orphan["pid"] is None and orphan["comm"] == inventory.NO_PROCESS
    assert leaky["workload"] is None and orphan["workload"] is None  # no workload_of given
    assert inventory.build(socks, owners, 1, port=9090)["closewait_total"] == 1


def test_inventory_groups_processes_by_workload():
    """(Synthetic sockets, owners and workloads.) The workload holding the
    most CLOSE_WAIT sockets comes first, its processes together, biggest first."""
    socks = [sock("CLOSE_WAIT", 8080, i, inode=100 + i) for i in range(5)]
    owners = {100: [Owner(1, "a", 3)], 101: [Owner(2, "b", 3)], 102: [Owner(2, "b", 4)],
              103: [Owner(3, "c", 3)], 104: [Owner(3, "c", 4)]}
    pods = {1: {"unit": None, "container": None, "pod": {"namespace": "shop", "name": "cart", "uid": "u",
                                                          "container": "app"}},
            2: {"unit": None, "container": None, "pod": {"namespace": "shop", "name": "cart", "uid": "u",
                                                          "container": "sidecar"}},
            3: {"unit": "nginx.service", "container": None, "pod": None}}
    rec = inventory.build(socks, owners, 1, workload_of=lambda pid, comm: pods[pid])
    # shop/cart holds 3 sockets (two processes), nginx.service 2
    assert [(g["pid"], g["count"]) for g in rec["closewait"]] == [(2, 2), (1, 1), (3, 2)]
    assert rec["closewait"][0]["workload"] == pods[2]


def test_queue_for_finds_the_listener_of_a_server_end():
    queues = [{"listener": "0.0.0.0:80"}, {"listener": "10.0.0.1:80"}, {"listener": "[::]:443"}]
    assert queue_for(queues, "10.0.0.1:80")["listener"] == "10.0.0.1:80"
    assert queue_for(queues, "10.0.0.2:80")["listener"] == "0.0.0.0:80"
    assert queue_for(queues, "10.0.0.2:443")["listener"] == "[::]:443"  # dual-stack
    assert queue_for(queues, "[fd00::1]:443")["listener"] == "[::]:443"
    assert queue_for(queues, "10.0.0.1:81") is None


# -- sock_diag parsing (a hand-packed inet_diag_msg) -------------------------------


def diag_msg(state=8, rq=5, wq=0, inode=1234, last_ack=1500) -> bytes:
    sockid = struct.pack(">HH16s16sIQ", 8080, 40000, socket.inet_aton("10.0.0.1").ljust(16, b"\0"),
                         socket.inet_aton("10.0.0.2").ljust(16, b"\0"), 0, 0)
    msg = struct.pack("=BBBB48sIIIII", socket.AF_INET, state, 0, 0, sockid, 0, rq, wq, 0, inode)
    info = bytearray(104)
    struct.pack_into("=I", info, 56, last_ack)
    attr = struct.pack("=HH", 4 + len(info), sockdiag.INET_DIAG_INFO) + bytes(info)
    return msg + attr


def test_parse_inet_diag_message():
    s = sockdiag.parse_message(7, diag_msg())
    assert (s.netns, s.family, s.state, s.local, s.remote) == (7, "ipv4", "CLOSE_WAIT", "10.0.0.1:8080",
                                                               "10.0.0.2:40000")
    assert (s.inode, s.recv_q, s.unread_bytes, s.last_ack_recv_ms) == (1234, 5, 4, 1500)


def test_parse_without_tcp_info():
    s = sockdiag.parse_message(7, diag_msg()[:72])
    assert s.last_ack_recv_ms is None and s.unread_bytes == 4


def test_listener_queue_is_not_unread_data():
    s = sockdiag.parse_message(7, diag_msg(state=10, rq=3, wq=128))
    assert s.state == "LISTEN" and s.unread_bytes == 3 and s.send_q == 128


# -- owners --------------------------------------------------------------------------


def test_owner_cache_rescans_on_a_miss_at_most_so_often():
    scans = []

    def scan(wanted=None):
        scans.append(1)
        return {5: [Owner(1, "a", 3)]}

    cache = OwnerCache(min_interval_s=60, scan=scan)
    assert cache.lookup(5) == [Owner(1, "a", 3)]
    assert cache.lookup(6) == [] and cache.lookup(7) == []  # misses within the interval: no rescan
    assert len(scans) == 1
    assert cache.lookup(0) == []


def test_owner_cache_stays_bounded_by_a_scan_bigger_than_itself():
    """A leaking host's scan finds more sockets than the cache may hold
    (synthetic scan): it keeps max_entries of them, the one asked for among them."""
    found = {ino: [Owner(1, "leaky", ino)] for ino in range(1, 1001)}
    cache = OwnerCache(min_interval_s=0, max_entries=100, scan=lambda wanted=None: dict(found))
    cache.SCAN_SHARE = 0
    assert cache.lookup(1000) == [Owner(1, "leaky", 1000)]
    assert len(cache._known) == 100
    assert cache.lookup(500) == [Owner(1, "leaky", 500)]  # a miss: a new scan, still bounded
    assert len(cache._known) == 100


def test_owner_cache_serves_a_batch_of_events_with_one_scan():
    scans = []

    def scan(wanted=None):
        scans.append(1)
        return {5: [Owner(1, "server", 3)], 6: [Owner(2, "client", 4)]}

    cache = OwnerCache(min_interval_s=60, scan=scan)
    cache.want(5)
    cache.want(6)  # the client's socket, from the same batch of events
    assert scans == []
    cache.resolve()
    assert cache.lookup(5) == [Owner(1, "server", 3)] and cache.lookup(6) == [Owner(2, "client", 4)]
    assert len(scans) == 1


def test_owner_cache_spaces_slow_scans_by_their_duration(monkeypatch):
    """A scan that takes 1 s (a host with 100,000 sockets; synthetic clock)
    is not repeated before 4 s more, whatever min_interval_s allows."""
    clock = [100.0]
    monkeypatch.setattr("tracer.host.procfs.time.monotonic", lambda: clock[0])
    scans = []

    def scan(wanted=None):
        scans.append(clock[0])
        clock[0] += 1.0
        return {}

    cache = OwnerCache(min_interval_s=0.5, scan=scan)
    assert cache.lookup(5) == [] and len(scans) == 1
    clock[0] += 3.9
    assert cache.lookup(6) == [] and len(scans) == 1  # 0.5 s has passed, 4 x 1 s has not
    clock[0] += 0.2
    assert cache.lookup(6) == [] and len(scans) == 2


def test_socket_owners_finds_our_own_socket():
    with socket.socket() as s:
        ino, fd = os.fstat(s.fileno()).st_ino, s.fileno()
        found = socket_owners({ino})
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    assert found == {ino: [Owner(os.getpid(), comm, fd)]}


def test_owner_cache_forgets_a_storms_sockets_and_scans_again():
    """(Synthetic scans.) What the tracer does when quiet again: the owners a
    storm's scans found are dropped, and the next collision's lookup scans the
    host as it is then, not as it was."""
    hosts = [{ino: [Owner(1, "storm", ino)] for ino in range(1, 501)}, {7: [Owner(2, "later", 3)]}]
    scans = []

    def scan(wanted=None):
        scans.append(1)
        return dict(hosts[min(len(scans), 2) - 1])  # the storm, then the host without it

    cache = OwnerCache(min_interval_s=0, scan=scan)
    cache.SCAN_SHARE = 0
    assert cache.lookup(500) == [Owner(1, "storm", 500)]
    assert len(cache._known) == 500
    cache.forget()
    assert cache._known == {}
    assert cache.lookup(7) == [Owner(2, "later", 3)] and len(scans) == 2
    assert cache.lookup(500) == []  # gone from the host: not served from the storm's scan


def test_owner_cache_tells_pending_from_not_held():
    """(Synthetic scans.) An inode asked for is `pending` until the next scan,
    then `found` or `not_held`; a socket no process held is not scanned for
    again on every lookup."""
    scans = []

    def scan(wanted=None):
        scans.append(1)
        return {5: [Owner(1, "a", 3)]}

    cache = OwnerCache(min_interval_s=0, scan=scan)
    cache.SCAN_SHARE = 0
    cache.want(5)
    cache.want(6)
    assert cache.status(5) == cache.status(6) == "pending" and cache.status(7) == "unasked"
    cache.resolve()
    assert cache.status(5) == "found" and cache.status(6) == "not_held"
    assert cache.lookup(6) == [] and len(scans) == 1


def test_a_report_waits_for_the_owner_scan_and_says_why_one_is_missing(monkeypatch):
    """(Synthetic stream, fake /proc scans, synthetic clock.) In a storm the
    scans are spaced out: an incident ending between two scans waits for the
    next one and is reported with its owner; one whose scan does not come
    within OWNER_WAIT_S is reported `lookup_deferred`; one whose socket no
    process held, `not_held`."""
    from tracer.host import diagnosis
    from tracer.pipeline.flow import Pipeline

    clock = [1000.0]
    monkeypatch.setattr("tracer.host.procfs.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("tracer.host.diagnosis.time.monotonic", lambda: clock[0])
    held = {4242: [Owner(77, "leakysrv", 9)]}
    slow = [0.0]  # how long a scan takes

    def scan(wanted=None):
        clock[0] += slow[0]
        return dict(held)

    cache = OwnerCache(min_interval_s=0.5, scan=scan)
    diag = diagnosis.Diagnoser(owners=cache)
    printed: list[dict] = []
    pipeline = Pipeline(Correlator(STATES, 250), CLOCK, "tracepoint", printed.append, host=diag)

    def collide(port: int, ino: int):
        col = Collision(client_port=port, closewait_sk=0xFFFF888100000000 + port * 0x1000)
        events = col.seed_sequence()
        events[0] = events[0].__class__(**{**events[0].__dict__, "sk_ino": ino})
        for ev in events:
            pipeline.feed(ev)
        diag.resolve()
        pipeline.release()

    collide(40001, 4242)  # the first scan is due: reported at once, with its owner
    assert [r["closewait_socket"]["owners"][0]["pid"] for r in printed] == [77]
    held[4343] = [Owner(78, "leakysrv", 10)]
    collide(40002, 4343)  # the next scan is not due: the report waits
    assert len(printed) == 1 and pipeline.held == 1
    clock[0] += 0.6
    diag.resolve()
    pipeline.release()
    assert len(printed) == 2 and printed[1]["closewait_socket"]["owners"][0]["pid"] == 78
    assert printed[1]["closewait_socket"]["owners_unknown"] is None
    collide(40003, 4444)  # nobody holds it: found missing by the next scan
    clock[0] += 0.6
    slow[0] = 1.0  # a host where a scan takes 1 s: the next one only 4 s later
    diag.resolve()
    pipeline.release()
    assert printed[2]["closewait_socket"]["owners"] == []
    assert printed[2]["closewait_socket"]["owners_unknown"] == "not_held"
    assert "No process held that socket (inode 4444)" in printed[2]["explanation"]
    held[4545] = [Owner(79, "leakysrv", 11)]
    collide(40004, 4545)
    assert len(printed) == 3  # waits for the next scan
    clock[0] += diagnosis.OWNER_WAIT_S  # and it is still not due
    diag.resolve()
    pipeline.release()
    assert printed[3]["closewait_socket"]["owners_unknown"] == "lookup_deferred"
    assert "not looked up in time" in printed[3]["explanation"]


def test_an_owner_the_scan_could_not_read_is_said_so():
    """(Synthetic scans.) A scan that could not read some processes'
    descriptors (another user's, without CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH)
    cannot say nobody held a socket it did not find: `not_readable`, not
    `not_held`; forgotten with the rest when quiet."""
    from tracer.host.procfs import Owners

    def scan(wanted=None):
        found = Owners({1: [Owner(1, "mine", 3)]})
        found.denied = 2
        return found

    cache = OwnerCache(min_interval_s=0, scan=scan)
    cache.SCAN_SHARE = 0
    assert cache.lookup(1) == [Owner(1, "mine", 3)]
    assert cache.lookup(2) == [] and cache.status(2) == "not_readable"
    cache.forget()
    assert cache.status(2) == "unasked"
    plain = OwnerCache(min_interval_s=0, scan=lambda wanted=None: {})
    plain.SCAN_SHARE = 0
    assert plain.lookup(2) == [] and plain.status(2) == "not_held"


def test_a_challenge_ack_held_back_by_the_limit_then_a_recovery_after_the_rto_is_explained():
    """Synthetic stream: the first SYN's challenge ACK is held back (the
    challenge-ACK limit, host-wide before 6.0), the client's SYN comes again
    after its RTO, is challenged and answered, and the connection recovers."""
    col = Collision()
    events = [col.syn_challenged(T0, passed=False), col.retransmit(T0 + S)] + col.seed_sequence(t0=T0 + S + 20_000)
    _, [inc] = run(events)
    rec = collision_record(inc, CLOCK, "tracepoint")
    assert (rec["outcome"], rec["outcome_detail"]) == ("recovered", "recovered_after_rto")
    assert rec["challenge_acks_limited"] == 1 and rec["challenge_acks_sent"] == 1 and rec["syn_hits"] == 2
    assert rec["penalty_ms"] >= 1000
    assert "held back by the kernel's rate limits" in rec["explanation"]
