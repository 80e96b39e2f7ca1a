"""A collision through address translation, without root: synthetic event
streams (tests/synthetic.py) of the NAT lab's collision (tracer/host/natlab.py)
as the two ends' kernels report it, each under its own tuple; the
translation's report and words; ctnetlink's messages. The live lab runs in
tests/test_nat_live.py."""

from __future__ import annotations

import socket
import struct

from tests.synthetic import HZ, MS, STATES, T0, Collision, correlate
from tracer.host import conntrack
from tracer.pipeline import translation
from tracer.pipeline.correlator import Correlator
from tracer.pipeline.join import estimate_shift
from tracer.pipeline.records import Clock, collision_record

SNDNXT, RCVNXT = 3_000_000_123, 1_234_567_890
SERVER_NS, CLIENT_NS = 4026532304, 4026532174


def masquerade(numbers=(SNDNXT, RCVNXT)) -> tuple[Collision, Collision]:
    """The reconnecting client 10.198.1.3:39836 masqueraded onto the router's
    10.198.2.1:39836: the server's end (outside) and the client's (inside)."""
    snd, rcv = numbers
    outside = Collision(server_ip="10.198.2.2", client_ip="10.198.2.1", netns=SERVER_NS, client_netns=SERVER_NS,
                        snd_nxt=snd, rcv_nxt=rcv)
    inside = Collision(server_ip="10.198.2.2", client_ip="10.198.1.3", netns=CLIENT_NS, client_netns=CLIENT_NS,
                       client_sk=0xFFFF8881000A0940, snd_nxt=snd, rcv_nxt=rcv)
    return outside, inside


def through_nat(outside: Collision, inside: Collision, t0: int = T0, client_shift: int = 0) -> list:
    """The lab's collision as one host's tracer sees it (client_shift: the
    client end's events stamped by another clock)."""
    t1 = t0 + 11 * MS
    c = client_shift
    return sorted([
        outside.syn_challenged(t0),
        inside.client_challenged(t0 + 36_000 + c, syn_ts=t0 - 20_000 + c),
        outside.rst_received(t0 + 50_000),
        outside.closewait_closed(t0 + 58_000),
        inside.retransmit(t1 + c),
        inside.client_established(t1 + 95_000 + c),
        outside.child_syn_recv(t1 + 134_000),
        outside.server_established(t1 + 149_000),
    ], key=lambda e: e.ts_ns)


def test_one_collision_through_masquerade_is_one_report():
    outside, inside = masquerade()
    _, incs = correlate(through_nat(outside, inside))
    assert len(incs) == 1
    inc = incs[0]
    assert inc.view == "both" and inc.outcome_detail == "recovered_fast" and not inc.incomplete
    assert inc.server == "10.198.2.2:12345" and inc.client == "10.198.1.3:39836"  # each end as it sees itself
    assert inc.netns == SERVER_NS and inc.client_netns == CLIENT_NS
    assert [s.name for s in inc.steps] == ["syn", "challenge_ack", "rst", "closewait_closed", "retry_syn",
                                           "established", "queued"]
    assert inc.step("rst").detail["seen_at"] == "client" and inc.step("rst").detail["in_window"] is True
    assert inc.step("challenge_ack").detail["matches_server"] is True
    assert inc.ends() == {"server": ("10.198.2.2:12345", "10.198.2.1:39836"),
                          "client": ("10.198.1.3:39836", "10.198.2.2:12345")}
    rec = collision_record(inc, Clock(0), "tracepoint")
    assert rec["translation"]["kind"] == "snat" and rec["translation"]["seen_by"] == "both_ends"
    assert rec["translation"]["before"] == {"client": "10.198.1.3:39836", "server": "10.198.2.2:12345"}
    assert rec["translation"]["after"] == {"client": "10.198.2.1:39836", "server": "10.198.2.2:12345"}
    assert rec["translation"]["rst_from"] == "client" and rec["translation"]["challenge_ack_reached_client"] is True
    assert rec["translation"]["conntrack"] is None and rec["translation"]["conntrack_unknown"] == "not_asked"
    assert "mapped the client 10.198.1.3:39836" in rec["explanation"]
    assert "onto 10.198.2.1:39836, a port the server 10.198.2.2:12345 still holds in CLOSE_WAIT" in rec["explanation"]


def test_the_client_end_first_joins_too():
    """Two hosts' recordings (a join) may put the client's event first."""
    outside, inside = masquerade()
    events = through_nat(outside, inside, client_shift=-100_000)  # the client's clock 100 us behind
    assert events[0].type == "client_challenged"
    _, incs = correlate(events)
    assert len(incs) == 1 and incs[0].view == "both"
    assert incs[0].server == "10.198.2.2:12345" and incs[0].client == "10.198.1.3:39836"
    assert incs[0].translated["before"][3:] == (bytes(bytearray([10, 198, 1, 3])), 39836)


def test_a_published_port_is_dnat():
    snd, rcv = SNDNXT, RCVNXT
    server_end = Collision(server_ip="10.198.2.2", client_ip="10.198.1.2", netns=SERVER_NS, client_netns=SERVER_NS,
                           snd_nxt=snd, rcv_nxt=rcv)
    client_end = Collision(server_ip="10.198.1.1", server_port=8080, client_ip="10.198.1.2", netns=CLIENT_NS,
                           client_netns=CLIENT_NS, client_sk=0xFFFF8881000A0940, snd_nxt=snd, rcv_nxt=rcv)
    _, incs = correlate(through_nat(server_end, client_end))
    assert len(incs) == 1
    rec = collision_record(incs[0], Clock(0), "tracepoint")
    assert rec["translation"]["kind"] == "dnat"
    assert rec["translation"]["before"]["server"] == "10.198.1.1:8080"
    assert rec["server"] == "10.198.2.2:12345" and rec["client"] == "10.198.1.2:39836"
    assert "forwarded the connection 10.198.1.2:39836 -> 10.198.1.1:8080 to 10.198.2.2:12345" in rec["explanation"]


def test_other_numbers_are_other_collisions():
    """Two collisions at once through the NAT, each end under its own tuple:
    joined by their own numbers, never across."""
    a_out, a_in = masquerade()
    b_out = Collision(server_ip="10.198.2.2", client_ip="10.198.2.1", client_port=40000, netns=SERVER_NS,
                      client_netns=SERVER_NS, closewait_sk=0xFFFF8881000B0000, child_sk=0xFFFF8881000B65C0)
    b_in = Collision(server_ip="10.198.2.2", client_ip="10.198.1.2", client_port=40000, netns=CLIENT_NS,
                     client_netns=CLIENT_NS, client_sk=0xFFFF8881000B0940, snd_nxt=b_out.snd_nxt,
                     rcv_nxt=b_out.rcv_nxt)
    events = sorted(through_nat(a_out, a_in) + through_nat(b_out, b_in, t0=T0 + 10_000), key=lambda e: e.ts_ns)
    _, incs = correlate(events)
    assert sorted(i.client for i in incs) == ["10.198.1.2:40000", "10.198.1.3:39836"]
    assert all(i.view == "both" and i.outcome == "recovered" for i in incs)
    # a client end whose numbers no server end has stays its own report
    stray = Collision(server_ip="10.198.2.2", client_ip="10.198.1.4", netns=CLIENT_NS, client_netns=CLIENT_NS,
                      snd_nxt=1, rcv_nxt=2)
    _, incs = correlate(through_nat(a_out, a_in) + stray.client_sequence(T0 + 5 * MS))
    assert sorted(i.view for i in incs) == ["both", "client"]


def test_the_repeat_syn_and_both_tuples_end_together():
    """The client's retried SYN hits the lingering socket again (its RST was
    lost): both ends' events land on the one incident; once it ends, neither
    tuple is open."""
    outside, inside = masquerade()
    c = Correlator(STATES, HZ)
    c.feed(outside.syn_challenged(T0))
    c.feed(inside.client_challenged(T0 + 36_000, syn_ts=T0 - 20_000))
    c.feed(outside.syn_challenged(T0 + 1000 * MS))
    c.feed(inside.client_challenged(T0 + 1000 * MS + 36_000))
    assert len({id(i) for i in c.open.values()}) == 1 and len(c.open) == 2
    incs = c.flush()
    assert len(incs) == 1 and incs[0].syn_hits == 2 and incs[0].challenges_received == 2
    assert c.open == {} and c._by_numbers == {}


def test_two_hosts_recordings_align_across_the_nat():
    """join.estimate_shift pairs the two hosts' incidents on the challenge
    ACK's numbers, whatever tuple each saw."""
    outside, inside = masquerade()
    server_events = [e for e in through_nat(outside, inside) if e.netns == SERVER_NS]
    client_events = [e for e in through_nat(outside, inside, client_shift=5_000 * MS) if e.netns == CLIENT_NS]
    _, server_incs = correlate(server_events)
    _, client_incs = correlate(client_events)
    assert server_incs[0].view == "server" and client_incs[0].view == "client"
    shift, uncertainty, matched = estimate_shift(server_incs, client_incs)
    assert matched == 1 and abs(shift + 5_000 * MS) <= uncertainty


def test_conntrack_alone_names_the_translation():
    """The server's end alone (the client on another host), with the
    translating namespace's conntrack entry (as tracer/host/conntrack.py
    parses it): the translation is named from it."""
    outside, _ = masquerade()
    _, incs = correlate([e for e in outside.seed_sequence() if e.skaddr != outside.client_sk])
    assert incs[0].view == "server"
    entry = {"original": {"src": "10.0.1.7:39836", "dst": "10.198.2.2:12345"},
             "reply": {"src": "10.198.2.2:12345", "dst": "10.198.2.1:39836"},
             "status": ["seen_reply", "assured", "confirmed", "src_nat"], "tcp_state": "ESTABLISHED",
             "timeout_s": 431999, "mark": 0, "zone": 0, "id": 7}
    ctx = {"conntrack": {"entry": entry, "netns": 4026531840,
                         "timeouts": {"established": 432000, "fin_wait": 120, "close_wait": 60, "last_ack": 30,
                                      "time_wait": 120, "close": 10}}}
    t = translation.describe(incs[0], ctx)
    assert t["kind"] == "snat" and t["seen_by"] == "conntrack" and t["conntrack"]["netns"] == 4026531840
    assert t["before"] == {"client": "10.0.1.7:39836", "server": "10.198.2.2:12345"}
    assert t["after"] == {"client": "10.198.2.1:39836", "server": "10.198.2.2:12345"}
    assert t["rst_from"] is None and t["challenge_ack_reached_client"] is None
    rec = collision_record(incs[0], Clock(0), "tracepoint", context=ctx)
    assert "A NAT on this host (network namespace 4026531840) mapped the client 10.0.1.7:39836" in rec["explanation"]
    assert "after 60 s in CLOSE_WAIT" in rec["explanation"]
    assert "from the client, or from the NAT itself" in rec["explanation"]
    # a lookup the budget left out is said
    rec = collision_record(incs[0], Clock(0), "tracepoint", context={"conntrack": {"entry": None, "unknown": "budget"}})
    assert rec["translation"] is None and rec["translation_unknown"] == "budget"


def test_ctnetlink_messages():
    """The GET request's layout (linux/netfilter/nfnetlink_conntrack.h), and
    an entry as the kernel answers it, built from the same attributes."""
    req = conntrack.get_request(socket.AF_INET, "reply", "10.198.2.2", 12345, "10.198.2.1", 39836, seq=9)
    length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert length == len(req) and msg_type == (1 << 8) | 1 and flags == 1 and seq == 9
    assert req[16:20] == bytes([socket.AF_INET, 0, 0, 0])
    attrs = conntrack._attrs(req[20:])
    assert list(attrs) == [conntrack.CTA_TUPLE_REPLY]
    tup = conntrack._endpoints(attrs[conntrack.CTA_TUPLE_REPLY])
    assert tup == {"src": "10.198.2.2:12345", "dst": "10.198.2.1:39836"}
    orig = conntrack._tuple_attr(conntrack.CTA_TUPLE_ORIG, socket.AF_INET6, "fd98:1::3", 39836, "fd98:2::2", 12345)
    body = (orig + conntrack._attr(conntrack.CTA_STATUS, struct.pack(">I", 0b1_1110))
            + conntrack._attr(conntrack.CTA_TIMEOUT, struct.pack(">I", 58))
            + conntrack._attr(conntrack.CTA_PROTOINFO | conntrack.NLA_F_NESTED, conntrack._attr(
                conntrack.CTA_PROTOINFO_TCP | conntrack.NLA_F_NESTED,
                conntrack._attr(conntrack.CTA_PROTOINFO_TCP_STATE, bytes([3])))))
    entry = conntrack.parse_entry(body)
    assert entry["original"] == {"src": "[fd98:1::3]:39836", "dst": "[fd98:2::2]:12345"}
    assert entry["status"] == ["seen_reply", "assured", "confirmed", "src_nat"]
    assert entry["tcp_state"] == "ESTABLISHED" and entry["timeout_s"] == 58


def test_a_challenge_event_ordered_after_the_clients_receipt_is_one_step():
    """Synthetic. The challenge hook's event stamped after the client's
    receipt of that ACK (another CPU): one challenge_ack step, the send's,
    with the receipt's numbers; nothing missed."""
    outside, inside = masquerade()
    events = [outside.syn_challenged_hooked(T0), inside.client_challenged(T0 + 20_000, syn_ts=T0 - 20_000),
              outside.challenge_ack(T0 + 30_000)] + [e for e in through_nat(outside, inside)
                                                     if e.type not in ("syn_challenged", "client_challenged")]
    _, (inc,) = correlate(sorted(events, key=lambda e: e.ts_ns))
    acks = [s for s in inc.steps if s.name == "challenge_ack"]
    assert len(acks) == 1 and acks[0].ts_ns == T0 + 30_000 and acks[0].detail["matches_server"] is True
    assert (inc.challenges_sent, inc.challenges_received) == (1, 1) and not inc.incomplete


def test_a_challenge_event_that_never_came_is_said():
    """Synthetic. The SYN's event announced the challenge hook's, which never
    came (the kernel did not run that program; seen on 5.10 under emulation):
    the client's receipt proves the send, and the incident says an event was
    missed."""
    outside, inside = masquerade()
    events = [outside.syn_challenged_hooked(T0)] + [e for e in through_nat(outside, inside)
                                                    if e.type != "syn_challenged"]
    _, (inc,) = correlate(sorted(events, key=lambda e: e.ts_ns))
    assert (inc.challenges_sent, inc.challenges_received) == (1, 1)
    assert inc.incomplete_reasons == ["event_missed"] and inc.outcome_detail == "recovered_fast"
    rec = collision_record(inc, Clock(0), "fentry")
    assert "did not report a challenge ACK" in rec["explanation"]
    # the server's end alone: nothing proves the send; it is not counted, and the miss is said
    _, (alone,) = correlate([outside.syn_challenged_hooked(T0), outside.rst_received(T0 + 50_000)])
    assert alone.challenges_sent == 0 and alone.incomplete_reasons == ["event_missed"]


def test_a_repeat_through_the_nat_is_named():
    """Synthetic. The same lingering socket hit again through the NAT (its
    old connection's port mapped onto once more), whichever end's event
    opened the first incident: the second says it repeats the first, on the
    same socket."""
    for client_first in (False, True):
        outside, inside = masquerade()
        first = through_nat(outside, inside, client_shift=-100_000 if client_first else 0)
        second = [e for e in through_nat(outside, inside, t0=T0 + 5_000 * MS)]
        _, incs = correlate(first + second)
        assert [i.view for i in incs] == ["both", "both"]
        assert incs[1].repeat_of == {"id": incs[0].id, "same": "socket"}, client_first
