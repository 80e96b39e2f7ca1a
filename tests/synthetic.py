"""Synthetic event streams for the unit tests (no kernel, no BPF).

Events are built directly as `tracer.events.Event`s, shaped like the ones the
tracepoint backend records (compare tests/data/seed-loopback-*.json): every
event carries the socket's own view (local = the socket's end), and the TCP
state numbers are the ones recorded with the fixtures (the kernel's
numbering, loaded from the IPv4 fixture). The fields an event does not set
take `Event`'s defaults, which, like its field list, come from the header
(tracer.pipeline.events.Layout): a field name the header lacks is an error.

`Collision` describes one connection tuple (server end owning the lingering
CLOSE_WAIT socket and the listener, client end reusing the port) and makes the
events of either end; `Collision.seed_sequence()` is the seed scenario's
whole recovery (SYN, challenge ACK, RST, the CLOSE_WAIT socket closed, retried
SYN, both ends established). `churn()` makes ordinary state changes of
connections that never collided.
"""

from __future__ import annotations

import ipaddress
import zlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tracer.pipeline.correlator import Correlator, Incident
from tracer.pipeline.events import AF_INET, AF_INET6, FLAGS, Event, decode

DATA = Path(__file__).parent / "data"
FIXTURES = ("seed-loopback-ipv4.json", "seed-loopback-ipv6.json")

MS = 1_000_000
S = 1_000_000_000


def load_fixture(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def fixture_states(fixture: dict) -> dict[int, str]:
    return {int(k): v for k, v in fixture["tcp_states"].items()}


def fixture_events(fixture: dict) -> list[Event]:
    """The fixture's raw records decoded, in kernel-timestamp order."""
    return sorted((decode(bytes.fromhex(r)) for r in fixture["records"]), key=lambda e: e.ts_ns)


# The kernel's TCP state numbering, as recorded with the fixtures.
STATES: dict[int, str] = fixture_states(load_fixture(FIXTURES[0]))
ST: dict[str, int] = {name: num for num, name in STATES.items()}
HZ: int = load_fixture(FIXTURES[0])["hz"]

F_OBSERVED = FLAGS["TC_F_AGE_OBSERVED"]
F_PASSED = FLAGS["TC_F_CHALLENGE_PASSED"]
F_JIFFIES = FLAGS["TC_F_AGE_JIFFIES"]
F_SYN_STAMP = FLAGS["TC_F_SYN_STAMP"]
F_SEEN = FLAGS["TC_F_CHALLENGE_SEEN"]

T0 = 5_000 * S  # an arbitrary kernel monotonic time for synthetic streams


def addr(text: str) -> bytes:
    """Packed address, padded to 16 bytes as decode() returns it."""
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


DEFAULT_SPREAD = zlib.crc32(f"127.0.0.1 12345 127.0.0.1 39836 {0xFFFF888100000000:x}".encode())


@dataclass
class Collision:
    """One connection tuple and the sockets of both its ends."""

    server_ip: str = "127.0.0.1"
    server_port: int = 12345
    client_ip: str = "127.0.0.1"
    client_port: int = 39836
    netns: int = 4026532246
    client_netns: int = 4026532246
    closewait_sk: int = 0xFFFF888100000000
    client_sk: int = 0xFFFF888100000940
    child_sk: int = 0xFFFF8881000065C0
    # the lingering socket's numbers (old connection); by default, 2471878311 and 2411062325 for the default
    # tuple and socket, and others for others (the correlator joins two ends seen under two tuples on them)
    snd_nxt: int | None = None
    rcv_nxt: int | None = None
    cpu: int = 0

    def __post_init__(self):
        spread = (zlib.crc32(f"{self.server_ip} {self.server_port} {self.client_ip} {self.client_port} "
                             f"{self.closewait_sk:x}".encode()) - DEFAULT_SPREAD) % 2**32
        if self.snd_nxt is None:
            self.snd_nxt = (2471878311 + spread) % 2**32
        if self.rcv_nxt is None:
            self.rcv_nxt = (2411062325 + spread * 7) % 2**32

    @property
    def family(self) -> int:
        return AF_INET6 if ":" in self.server_ip else AF_INET

    @property
    def server(self) -> str:
        return f"[{self.server_ip}]:{self.server_port}" if self.family == AF_INET6 else \
            f"{self.server_ip}:{self.server_port}"

    @property
    def client(self) -> str:
        return f"[{self.client_ip}]:{self.client_port}" if self.family == AF_INET6 else \
            f"{self.client_ip}:{self.client_port}"

    # -- one event from either end -------------------------------------------

    def server_ev(self, etype: str, ts: int, old: str, new: str | None = None, *, sk: int | None = None,
                  hook: str = "tp_set_state", **kw) -> Event:
        return Event(
            ts_ns=ts, type=etype, hook=hook, cpu=self.cpu, netns=self.netns, family=self.family,
            laddr=addr(self.server_ip), lport=self.server_port, raddr=addr(self.client_ip), rport=self.client_port,
            oldstate=ST[old], newstate=ST[new or old], skaddr=self.closewait_sk if sk is None else sk,
            comm="python3", **kw)

    def client_ev(self, etype: str, ts: int, old: str, new: str | None = None, *, hook: str = "tp_set_state",
                  **kw) -> Event:
        return Event(
            ts_ns=ts, type=etype, hook=hook, cpu=self.cpu, netns=self.client_netns, family=self.family,
            laddr=addr(self.client_ip), lport=self.client_port, raddr=addr(self.server_ip), rport=self.server_port,
            oldstate=ST[old], newstate=ST[new or old], skaddr=self.client_sk, comm="python3", **kw)

    # -- the steps of a collision ----------------------------------------------

    def syn_challenged(self, ts: int, passed: bool = True, age_jiffies: int | None = 7250,
                       observed_age_ns: int | None = None) -> Event:
        """The lingering socket challenges the SYN. Its age comes as the
        kernel gives it, in jiffies since its last accepted ACK
        (TC_F_AGE_JIFFIES); `observed_age_ns` makes the event of a recording
        of a version before 0.2 (TC_F_AGE_OBSERVED), which no 0.4 kernel
        side produces."""
        flags = (F_PASSED if passed else 0) | (F_OBSERVED if observed_age_ns is not None else 0) | \
            (F_JIFFIES if age_jiffies is not None else 0)
        return self.server_ev("syn_challenged", ts, "CLOSE_WAIT", hook="tp_kfree_skb", seq=self.snd_nxt,
                              ack=self.rcv_nxt, observed_age_ns=observed_age_ns or 0, age_jiffies=age_jiffies or 0,
                              flags=flags)

    def syn_challenged_hooked(self, ts: int) -> Event:
        """The SYN's event where a challenge hook is attached (fentry/kprobe):
        it says a challenge_ack event follows (TC_F_CHALLENGE_SEEN)."""
        return self.server_ev("syn_challenged", ts, "CLOSE_WAIT", hook="fe_rcv_state", seq=self.snd_nxt,
                              ack=self.rcv_nxt, age_jiffies=7250, flags=F_SEEN | F_JIFFIES)

    def challenge_ack(self, ts: int, passed: bool = True) -> Event:
        """tcp_send_challenge_ack() returned: the ACK went out (or the limiter held it back)."""
        return self.server_ev("challenge_ack", ts, "CLOSE_WAIT", hook="kp_challenge", seq=self.snd_nxt,
                              ack=self.rcv_nxt, flags=F_PASSED if passed else 0)

    def rst_sent(self, ts: int, seq: int | None = None) -> Event:
        """The client, in SYN-SENT, answers the challenge ACK."""
        return self.client_ev("rst_sent", ts, "SYN_SENT", hook="tp_send_reset",
                              seq=self.rcv_nxt if seq is None else seq)

    def client_challenged(self, ts: int, syn_ts: int | None = None, seq: int | None = None, ack: int | None = None,
                          **kw) -> Event:
        """The client's SYN-SENT socket resets the challenge ACK it received
        (tcp:tcp_send_reset): the ACK's numbers as received, and the time
        since the client's first SYN (tp->retrans_stamp) when `syn_ts` is given."""
        flags = F_SYN_STAMP if syn_ts is not None else 0
        return self.client_ev("client_challenged", ts, "SYN_SENT", hook="tp_send_reset",
                              seq=self.snd_nxt if seq is None else seq, ack=self.rcv_nxt if ack is None else ack,
                              syn_age_ns=ts - syn_ts if syn_ts is not None else 0, flags=flags, **kw)

    def client_gave_up(self, ts: int) -> Event:
        return self.client_ev("state", ts, "SYN_SENT", "CLOSE")

    def rst_received(self, ts: int) -> Event:
        return self.server_ev("rst_received", ts, "CLOSE_WAIT", hook="tp_receive_reset")

    def closewait_closed(self, ts: int) -> Event:
        return self.server_ev("state", ts, "CLOSE_WAIT", "CLOSE")

    def retransmit(self, ts: int) -> Event:
        return self.client_ev("retransmit", ts, "SYN_SENT", hook="tp_retransmit")

    def client_established(self, ts: int) -> Event:
        return self.client_ev("state", ts, "SYN_SENT", "ESTABLISHED")

    def child_syn_recv(self, ts: int) -> Event:
        """The retried SYN reached the listener: a child socket is born."""
        return self.server_ev("state", ts, "LISTEN", "SYN_RECV", sk=self.child_sk)

    def server_established(self, ts: int) -> Event:
        return self.server_ev("state", ts, "SYN_RECV", "ESTABLISHED", sk=self.child_sk)

    def seed_sequence(self, t0: int = T0, retry_after: int = 11 * MS) -> list[Event]:
        """The seed scenario's recovery on loopback, timed like the recording."""
        t1 = t0 + retry_after
        return [
            self.syn_challenged(t0),
            self.rst_sent(t0 + 36_000),
            self.rst_received(t0 + 50_000),
            self.closewait_closed(t0 + 58_000),
            self.retransmit(t1),
            self.client_established(t1 + 95_000),
            self.child_syn_recv(t1 + 134_000),
            self.server_established(t1 + 149_000),
        ]


    def client_sequence(self, t0: int = T0, retry_after: int = 11 * MS, rtt: int = 36_000) -> list[Event]:
        """What the client's kernel alone reports (the server traced elsewhere):
        its first SYN left at t0, the challenge ACK came back `rtt` later and
        was reset, the SYN was retried and the connection established."""
        t1 = t0 + rtt + retry_after
        return [
            self.client_challenged(t0 + rtt, syn_ts=t0),
            self.retransmit(t1),
            self.client_established(t1 + 95_000),
        ]

    def both_sequence(self, t0: int = T0, retry_after: int = 11 * MS) -> list[Event]:
        """Both ends traced on one host, as the current BPF side reports them:
        the client's reset is a `client_challenged` event (its SYN left 20 us
        before the server's kernel dropped it)."""
        seq = self.seed_sequence(t0, retry_after)
        return [self.client_challenged(e.ts_ns, syn_ts=t0 - 20_000) if e.type == "rst_sent" else e for e in seq]


def churn(n: int, t0: int = T0, seed: int = 1, server_port: int = 12345, step_ns: int = 10_000) -> list[Event]:
    """`n` ordinary state changes of connections that never collided: clients
    connecting to `server_port` from many ports, both ends, every state."""
    rng = random.Random(seed)
    names = [STATES[k] for k in sorted(STATES)]
    out = []
    for i in range(n):
        c = Collision(client_port=20000 + rng.randrange(19000), closewait_sk=0xFFFF888200000000 + 0x100 * i,
                      client_sk=0xFFFF888300000000 + 0x100 * i)
        old, new = rng.choice(names), rng.choice(names)
        ts = t0 + i * step_ns
        etype = rng.choice(("state", "state", "state", "rst_sent", "rst_received", "retransmit", "queued"))
        make = c.server_ev if rng.random() < 0.5 else c.client_ev
        out.append(make(etype, ts, old, new))
    return out


def correlate(events, flush: bool = True, **kw) -> tuple[Correlator, list[Incident]]:
    """Feed events to a fresh correlator (kernel numbering of the fixtures);
    return it and the incidents it ended (all of them, with flush)."""
    kw.setdefault("hz", HZ)
    c = Correlator(STATES, **kw)
    out = []
    for ev in events:
        out += c.feed(ev)
    if flush:
        out += c.flush()
    return c, out
