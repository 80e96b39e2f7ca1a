"""The correlator: a pure state machine from kernel events to collision incidents.

No I/O, no clock of its own: time is the kernel's (event timestamps, and the
`now_ns` given to tick()). Feed it events in timestamp order (tracer/pipeline/reorder.py
does that for a live stream); it returns incidents as they complete.

A collision is keyed by its connection tuple, oriented server/client: the
server end owns the lingering socket and the listener, the client end reuses
the port. Events from both ends (loopback, or two namespaces of one host) land
on the same incident.

Either end can start it: the server's kernel sees the SYN challenged by its
lingering socket (`syn_challenged`), the client's kernel sees its SYN-SENT
socket reset the challenge ACK (`client_challenged`). An incident's `view`
says which ends were seen: "server", "client", or "both" (one incident, never
two reports, whichever end's event comes first).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from tracer.pipeline.events import EVENT_TYPES, Event, format_addr

# Step names, in the order they normally happen.
STEPS = ("syn", "challenge_ack", "rst", "closewait_closed", "server_closed", "retry_syn", "established", "queued",
         "client_closed")
OUTCOMES = ("recovered", "stuck", "gave_up", "pending")
# The finer outcome (`outcome_detail`), each explained by tracer/pipeline/explain.py.
OUTCOME_DETAILS = (
    "recovered_fast",  # the client re-armed its SYN timer right after the RST (Linux >= 5.6)
    "recovered_after_rto",  # the retry waited a retransmission timeout (older or non-Linux client, or a repeat)
    "stuck_rate_limited",  # challenge ACKs held back by tcp_invalid_ratelimit / tcp_challenge_ack_limit
    "stuck_challenge_ack_lost",  # challenge ACKs sent, no RST came back: lost on the path
    "stuck",  # the client keeps hitting the socket, cause not seen
    "client_gave_up",  # the connecting socket was closed before it was established
    # established unseen by the state hook, found so afterwards (sock_diag, or an end leaving ESTABLISHED): when is not known
    "recovered_unseen",
    "pending",  # not established when the trace or the incident's time ran out, nothing more seen
)
# The reasons that may hide the new connection's establishment: an incident with one of them that
# ended without it is checked against the kernel's socket list (Correlator.confirm).
UNSEEN_ESTABLISHMENT = frozenset({"state_hook_off", "events_lost", "runs_skipped", "tracking_evicted"})
# Why an incident may miss kernel events (`incomplete_reasons`), each explained by tracer/pipeline/explain.py.
INCOMPLETE_REASONS = (
    "events_lost",  # the perf buffer was full: events lost while it was open or on their way
    "runs_skipped",  # the kernel counted skipped BPF runs (recursion_misses) while it was open
    # an end left ESTABLISHED without its arrival there having been streamed, whatever the kernel counted
    "arrival_unseen",
    "tracking_evicted",  # map `tracked` was full and evicted its entry: its later events were not streamed
    "state_hook_off",  # it began while the lazy state hook was detached and never got established
    "established_unseen",  # so, but sock_diag found it established afterwards: the delay is not known
    "recording_cut",  # a replay: the recording ends (cut short: a full disk, a killed tracer) while it was open
    # the challenge hook's event, announced by the SYN's (TC_F_CHALLENGE_SEEN), never came: the kernel did not run it
    "event_missed",
)
# States of a socket on the collision's tuple that prove the new connection was
# established, at each end (it was SYN_SENT at the client, and starts at
# SYN_RECV at the server).
ESTABLISHED_SINCE = {
    "server": ("ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSING", "TIME_WAIT", "CLOSE_WAIT", "LAST_ACK"),
    "client": ("ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSING", "CLOSE_WAIT", "LAST_ACK"),
}
# The old (lingering) socket is on the same tuple at the server: the states it
# can be in from its lingering state on prove nothing, unless it is known to
# be dead (its RST received).
LINGERING_NEXT = {
    "CLOSE_WAIT": ("CLOSE_WAIT", "LAST_ACK"),
    "LAST_ACK": ("LAST_ACK",),
    "FIN_WAIT1": ("FIN_WAIT1", "FIN_WAIT2", "CLOSING", "TIME_WAIT"),
    "FIN_WAIT2": ("FIN_WAIT2", "TIME_WAIT"),
    "CLOSING": ("CLOSING", "TIME_WAIT"),
    "TIME_WAIT": ("TIME_WAIT",),
}
FAST_RETRY_NS = 200_000_000  # TCP_RTO_MIN: no retransmission timeout is shorter
RECENT = 1024  # finished incidents remembered to recognise repeats

Key = tuple[int, bytes, int, bytes, int]  # family, server addr, server port, client addr, client port

MAX_RAW_EVENTS = 64  # raw events kept per incident (for --verbose and research)
MAX_STATE_GAPS = 4096  # the state hook's gaps remembered (an incident older than them all counts as in one)


@dataclass
class Step:
    name: str
    ts_ns: int
    detail: dict = field(default_factory=dict)


@dataclass
class Incident:
    id: int
    key: Key
    family: int
    server: str
    client: str
    netns: int  # the server end's network namespace
    first_ns: int
    lingering_state: str
    closewait: dict  # the lingering socket: skaddr, inode, seq/ack, age
    steps: list[Step] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    client_netns: int | None = None
    outcome: str | None = None
    ended_by: str = ""  # "complete", "timeout", "flush", "evicted", "superseded" (the tuple collided again)
    # why kernel events may be missing from it (INCOMPLETE_REASONS), in the order found
    incomplete_reasons: list[str] = field(default_factory=list)
    syn_hits: int = 1  # SYNs of this connection that hit the lingering socket
    established_ends: set[str] = field(default_factory=set)  # "client", "server"
    client_process: dict | None = None  # who called connect() (connect hook)
    challenges_limited: int = 0  # challenge ACKs the rate limiter held back
    challenges_sent: int = 0  # challenge ACKs that went out
    challenges_pending: int = 0  # challenged SYNs whose challenge hook's event has not come yet
    outcome_detail: str | None = None
    stuck_reason: str | None = None  # why the client kept hitting the socket (also when it then gave up)
    repeat_of: dict | None = None  # {"id": N, "same": "socket" | "port"}: an earlier incident on the same socket or tuple
    last_ns: int = 0
    seen_server: bool = True  # the server end's evidence: its lingering socket challenged the SYN
    seen_client: bool = False  # the client end's evidence: its SYN-SENT socket reset a challenge ACK
    client_sk: int | None = None  # the connecting socket (kernel address), when the client end is traced
    client_inode: int | None = None  # its struct socket's inode, to find the connecting process
    challenges_received: int = 0  # challenge ACKs the client received (and answered with RST)
    client_syn_ns: int | None = None  # when the client sent its first SYN (tp->retrans_stamp)
    skips_near: bool = False  # the kernel skipped BPF runs while it was open or about to start
    # the two ends see the connection under different tuples (an address translation between them):
    # {"before": Key, "after": Key}, the client's tuple and the server's (`key` is one of them)
    translated: dict | None = None

    @property
    def view(self) -> str:
        """Which ends of the collision were traced: "server", "client" or "both"."""
        if self.seen_server and self.seen_client:
            return "both"
        return "client" if self.seen_client else "server"

    @property
    def keys(self) -> tuple[Key, ...]:
        """Its tuples: the one it is keyed by, and the other end's when a translation is between them."""
        if self.translated is None:
            return (self.key,)
        return (self.key, *(k for k in self.translated.values() if k != self.key))

    def ends(self) -> dict[str, tuple[str, str]]:
        """Each end's (local, remote) endpoints, as that end sees them."""
        if self.translated is None:
            return {"server": (self.server, self.client), "client": (self.client, self.server)}
        before, after = self.translated["before"], self.translated["after"]
        return {"server": (endpoint(after, True), endpoint(after, False)),
                "client": (endpoint(before, False), endpoint(before, True))}

    @property
    def home_netns(self) -> int | None:
        """The namespace the incident was seen in: the server's, else the client's."""
        return self.netns if self.seen_server else self.client_netns

    def step(self, name: str) -> Step | None:
        for s in self.steps:  # a plain loop: on the hot path, several times per event
            if s.name == name:
                return s
        return None

    def has(self, name: str) -> bool:
        return self.step(name) is not None

    @property
    def ghost(self) -> bool:
        """The lingering socket died without ever being accept()ed (it had no
        struct socket): it still counts in its listener's accept queue."""
        return self.closewait["inode"] is None and self.has("closewait_closed")

    @property
    def incomplete(self) -> bool:
        return bool(self.incomplete_reasons)

    def mark_incomplete(self, reason: str) -> None:
        if reason not in self.incomplete_reasons:
            self.incomplete_reasons.append(reason)

    @property
    def may_have_missed_establishment(self) -> bool:
        """Not seen established, and events may be missing that would have
        said it was: the kernel's socket list can still tell (confirm())."""
        return not self.has("established") and any(r in UNSEEN_ESTABLISHMENT for r in self.incomplete_reasons)

    @property
    def established_unseen(self) -> bool:
        """Established, as the kernel's socket list showed afterwards
        (confirm()): when is not known."""
        est = self.step("established")
        return est is not None and est.detail.get("seen_by") in ("sock_diag", "state_change")

    @property
    def penalty_ns(self) -> int | None:
        est = self.step("established")
        if est is None or self.established_unseen:
            return None
        return est.ts_ns - self.first_ns

    def sort_steps(self) -> None:
        self.steps.sort(key=lambda s: (s.ts_ns, STEPS.index(s.name)))

    def add(self, name: str, ts_ns: int, **detail) -> Step:
        s = Step(name, ts_ns, detail)
        self.steps.append(s)
        return s


def endpoint(key: Key, server: bool) -> str:
    """A tuple's server (or client) end, as ADDR:PORT."""
    family, saddr, sport, caddr, cport = key
    return format_addr(family, saddr, sport) if server else format_addr(family, caddr, cport)


def translation_kind(before: Key, after: Key) -> str | None:
    """What changed between the client's tuple and the server's: "snat" (the
    client's address or port: masquerade or snat), "dnat" (the server's), both
    ("snat+dnat"), or None."""
    src = before[3:] != after[3:]
    dst = before[1:3] != after[1:3]
    return "snat+dnat" if src and dst else "snat" if src else "dnat" if dst else None


def _key(ev: Event, local_is_server: bool) -> Key:
    laddr = ev.laddr[:16] if ev.family == 10 else ev.laddr[:4]
    raddr = ev.raddr[:16] if ev.family == 10 else ev.raddr[:4]
    if local_is_server:
        return (ev.family, laddr, ev.lport, raddr, ev.rport)
    return (ev.family, raddr, ev.rport, laddr, ev.lport)


@dataclass(frozen=True)
class Settings:
    """The correlator's settings, and their one home: the command line's
    --incident-timeout, a live session, a recording's header and its replay
    all start from these defaults."""

    timeout_ns: int = 15_000_000_000  # an incident never established ends after this long
    grace_ns: int = 200_000_000  # once established, wait this long for its last events (queued, client closed)
    max_open: int = 4096  # incidents open at once; the oldest is evicted beyond
    loss_window_ns: int = 500_000_000  # incidents starting this long after a loss report may miss events too

    def header(self) -> dict:
        """What a recording keeps of them (the rest is fixed by the code)."""
        return {"incident_timeout_ns": self.timeout_ns, "grace_ns": self.grace_ns}

    @classmethod
    def from_header(cls, head: dict) -> Settings:
        """The settings a recording was made with (defaults where its header is silent)."""
        given = {"timeout_ns": head.get("incident_timeout_ns"), "grace_ns": head.get("grace_ns")}
        return cls(**{k: v for k, v in given.items() if v is not None})


class Correlator:
    """Events in, incidents out.

    states: kernel TCP state number -> name ("CLOSE_WAIT"), from the running
    kernel (or the recording). hz: the kernel's jiffies per second, to turn
    an estimated age into seconds (None: unknown). settings: see Settings;
    keyword arguments replace single fields of it (the tests' short timeouts)."""

    def __init__(self, states: dict[int, str], hz: int | None = None, settings: Settings = Settings(), **fields):
        settings = dataclasses.replace(settings, **fields)
        self.settings = settings
        self.states = states
        self.state_nums = {v: k for k, v in states.items()}
        self.hz = hz
        self.grace_ns = settings.grace_ns
        self.timeout_ns = settings.timeout_ns
        self.max_open = settings.max_open
        self.loss_window_ns = settings.loss_window_ns
        # A loss (events lost, or BPF runs the kernel skipped) is reported
        # after events that preceded it may still wait in the caller's reorder
        # buffer: incidents starting up to `_marks[reason]` (kernel time) may
        # miss events too. `_unplaced`: the reasons reported with no time;
        # the next tick() places them.
        self._marks = {"events_lost": -1, "runs_skipped": -1, "state_runs_skipped": -1}
        self._unplaced: set[str] = set()
        self.skipped_runs = 0
        # When the state-change hook was not attached (a live session attaches
        # it only while collisions are in progress): the start of the current
        # gap (None: attached), and the gaps that ended, latest last.
        self._state_off_since: int | None = None
        self._state_gaps: deque[tuple[int, int]] = deque(maxlen=MAX_STATE_GAPS)
        self.open: dict[Key, Incident] = {}  # by each of its tuples (two when a translation is between its ends)
        # open incidents by the challenge ACK's numbers (family, snd_nxt, rcv_nxt): a NAT rewrites addresses and
        # ports, not sequence numbers, so the two ends of one collision seen under two tuples share them
        self._by_numbers: dict[tuple[int, int, int], Incident] = {}
        # finished incidents, by lingering socket and by tuple (bounded, oldest first out); a socket is
        # its address and the tuple it holds: a freed socket's memory is soon another socket's (the slab),
        # TIME_WAIT sockets' above all, and a new one at the same address on another tuple is not the same
        self.recent_sockets: OrderedDict[tuple[int, int, Key], int] = OrderedDict()
        self.recent_tuples: OrderedDict[tuple[int, Key], int] = OrderedDict()
        self.next_id = 1
        # raw events kept per incident: only a verbose report shows them (Pipeline sets 0
        # otherwise: a storm's thousands of incidents waiting to be reported would hold them all)
        self.raw_events = MAX_RAW_EVENTS
        self.events_seen = 0
        self.lost_events = 0
        self.ignored_events = 0
        self._due = float("inf")  # no open incident's wait is over before this (kernel ns)

    # -- public interface ------------------------------------------------

    def feed(self, ev: Event) -> list[Incident]:
        """One event (in timestamp order). Returns incidents this completed."""
        self.events_seen += 1
        done = self._expire(ev.ts_ns)
        start = START_HANDLERS.get(ev.type)
        if start is not None:
            done += start(self, ev)
            return done
        found = self._find(ev)
        if found is None:
            self.ignored_events += 1
            return done
        inc, local_is_server = found
        if len(inc.events) < self.raw_events:
            inc.events.append(ev)
        inc.last_ns = ev.ts_ns
        if ev.conn_pid and not local_is_server and inc.client_process is None:
            inc.client_process = {"pid": ev.conn_pid, "comm": ev.conn_comm}
        STEP_HANDLERS[ev.type](self, inc, ev, local_is_server)
        if self._complete(inc):
            done.append(self._close(inc, "complete"))
        return done

    def tick(self, now_ns: int) -> list[Incident]:
        """Time passed (kernel clock): end incidents whose wait is over."""
        for reason in self._unplaced:
            # the events fed so far reach about now_ns; the ones the loss may
            # have cut short are older than the loss report, which the caller's
            # reorder delay (< loss_window_ns) puts at most that far ahead
            self._marks[reason] = max(self._marks[reason], now_ns + self.loss_window_ns)
        self._unplaced.clear()
        return self._expire(now_ns)

    def _expire(self, now_ns: int) -> list[Incident]:
        """End the incidents whose wait is over. Called for every event: the
        open incidents are walked only once the earliest end is due."""
        if now_ns < self._due:
            return []
        done = []
        due = float("inf")
        for inc in self.incidents():
            est = inc.step("established")
            if est is not None and now_ns - est.ts_ns >= self.grace_ns:
                done.append(self._close(inc, "complete"))
            elif est is None and now_ns - inc.first_ns >= self.timeout_ns:
                done.append(self._close(inc, "timeout"))
            else:
                due = min(due, self._deadline(inc))
        self._due = due
        return done

    def _deadline(self, inc: Incident) -> int:
        """When its wait is over: the grace after it was established, else the timeout."""
        est = inc.step("established")
        return est.ts_ns + self.grace_ns if est is not None else inc.first_ns + self.timeout_ns

    def incidents(self) -> list[Incident]:
        """The open incidents, each once (`open` holds a translated one under both its tuples)."""
        return list({id(inc): inc for inc in self.open.values()}.values())

    def _opened(self, inc: Incident) -> None:
        self.open[inc.key] = inc
        self._by_numbers[_numbers(inc)] = inc
        self._due = min(self._due, self._deadline(inc))

    def _twin(self, ev: Event, end: str) -> Incident | None:
        """The open incident that saw only the other end of this collision
        under another tuple: the same challenge ACK's numbers (the lingering
        socket's snd_nxt and rcv_nxt, as it sent them and as the client got
        them), with its `end` not seen yet."""
        inc = self._by_numbers.get((ev.family, ev.seq, ev.ack))
        if inc is None or inc.translated is not None or (inc.seen_client if end == "client" else inc.seen_server):
            return None
        return inc

    def _join(self, inc: Incident, key: Key, local_is_server: bool) -> None:
        """The other end of `inc`, seen under the tuple `key`: one collision
        through an address translation. The report names each end as it
        sees itself (the server's address from its end, the client's from
        its end) and both tuples (`translated`)."""
        self.open[key] = inc
        before, after = (inc.key, key) if local_is_server else (key, inc.key)
        inc.translated = {"before": before, "after": after}
        inc.server, inc.client = endpoint(after, True), endpoint(before, False)

    def lost(self, count: int, at_ns: int | None = None) -> None:
        """The kernel dropped `count` events: every open incident may miss
        some, and so may the incidents whose first events were still on their
        way here when the loss was reported (a caller reordering events feeds
        them later). at_ns: when the loss was reported (kernel clock):
        incidents starting up to then are marked; without it, the ones
        starting before the next tick() plus loss_window_ns (conservative:
        a few complete incidents may be marked too)."""
        self.lost_events += count
        self._mark("events_lost", at_ns)

    def skipped(self, runs: int, at_ns: int | None = None, only_state_hook: bool = False) -> None:
        """The kernel skipped `runs` runs of the tracer's programs (a hook
        that fired while another BPF program ran on that CPU): their events
        were never made, and no perf buffer counts them. Marked like a loss
        (runs_skipped), since which incident they belonged to is not known.
        `only_state_hook`: all were runs of the state hook, which can only
        hide state changes: an incident then counts as touched only if it
        ends without every traced end seen established and queued."""
        self.skipped_runs += runs
        self._mark("runs_skipped" if not only_state_hook else "state_runs_skipped", at_ns)

    def evicted(self, keys) -> None:
        """Map `tracked` evicted the kernel's entries of these open incidents
        (tuple keys, as `open`): their later events were not streamed."""
        for key in keys:
            inc = self.open.get(key)
            if inc is not None:
                inc.mark_incomplete("tracking_evicted")

    def _mark(self, reason: str, at_ns: int | None) -> None:
        for inc in self.incidents():
            self._may_miss(inc, reason)
        if at_ns is None:
            self._unplaced.add(reason)
        else:
            self._marks[reason] = max(self._marks[reason], at_ns)

    def state_hook(self, attached: bool, at_ns: int) -> None:
        """The state-change hook was attached (detached) at `at_ns` (kernel
        clock). An incident that started while it was not attached may have
        missed the state changes that came before it was: its kill is also
        known from the RST it received, but an establishment missed there
        would leave it unfinished, so one that ends without an established
        connection is marked incomplete rather than reported stuck or pending."""
        if not attached:
            if self._state_off_since is None:
                self._state_off_since = at_ns
        elif self._state_off_since is not None:
            self._state_gaps.append((self._state_off_since, at_ns))
            self._state_off_since = None

    def _state_blind(self, ts_ns: int) -> bool:
        if self._state_off_since is not None and ts_ns >= self._state_off_since:
            return True
        if len(self._state_gaps) == self._state_gaps.maxlen and ts_ns < self._state_gaps[0][0]:
            return True  # older than every gap remembered: assume the worst
        return any(start <= ts_ns < end for start, end in self._state_gaps)

    def _mark_new(self, inc: Incident, ts_ns: int) -> None:
        """A new incident starting at ts_ns: may a loss reported already have touched it?"""
        for reason, until in self._marks.items():
            if reason in self._unplaced or ts_ns <= until:
                self._may_miss(inc, reason)

    @staticmethod
    def _may_miss(inc: Incident, reason: str) -> None:
        """A loss may have touched it. Lost events, and skipped runs of any
        program, can be any of its steps: marked at once. Skipped runs of the
        state hook alone (the program that nests on a CPU in a storm: a state
        change in a softirq interrupting one in process context) can only
        hide state changes: they mark it only if it ends without every traced
        end seen established and queued (_close)."""
        if reason == "state_runs_skipped":
            inc.skips_near = True
        else:
            inc.mark_incomplete(reason)

    def cut(self) -> None:
        """The stream was cut short (a recording that ends before its end):
        what happened next to the incidents open now is not known."""
        for inc in self.incidents():
            inc.mark_incomplete("recording_cut")

    def flush(self) -> list[Incident]:
        """The stream ended: close every open incident with what is known."""
        return [self._close(inc, "flush") for inc in self.incidents()]

    # -- event handlers ----------------------------------------------------

    def _state(self, num: int) -> str:
        return self.states.get(num, str(num))

    def _find(self, ev: Event) -> tuple[Incident, bool] | None:
        for local_is_server in (True, False):
            inc = self.open.get(_key(ev, local_is_server))
            if inc is not None:
                return inc, local_is_server
        return None

    def _age(self, ev: Event) -> tuple[float | None, str]:
        if ev.has("TC_F_AGE_OBSERVED"):
            return ev.observed_age_ns / 1e9, "observed"
        if ev.has("TC_F_AGE_JIFFIES") and self.hz:
            return ev.age_jiffies / self.hz, "estimated"
        return None, "unknown"

    def _on_syn_challenged(self, ev: Event) -> list[Incident]:
        key = _key(ev, True)
        done = []
        inc = self.open.get(key)
        if inc is None:
            inc = self._twin(ev, "server")
            if inc is not None:  # the client's end, seen under another tuple: a translation between them
                self._join(inc, key, True)
        if inc is not None and not inc.seen_server:
            # the client's end started it (its event came first): the same collision
            self._adopt_server(inc, ev)
            return done
        if inc is not None and inc.closewait["skaddr"] != ev.skaddr:
            # a new lingering socket on the same tuple: the port collides again
            done.append(self._close(inc, "superseded"))
            inc = None
        if inc is not None:  # the same connection's SYN hit the lingering socket again
            inc.syn_hits += 1
            inc.last_ns = ev.ts_ns
            if len(inc.events) < self.raw_events:
                inc.events.append(ev)
            retry = self._last_unresolved_retry(inc)
            if retry is None:
                retry = inc.add("retry_syn", ev.ts_ns, attempt=inc.syn_hits - 1)
            retry.detail["reached"] = "lingering socket"
            self._challenge_from_syn(inc, ev, retry)
            return done
        self._make_room(done)
        age_s, age_source = self._age(ev)
        inc = Incident(
            id=self.next_id,
            key=key,
            family=ev.family,
            server=format_addr(ev.family, ev.laddr, ev.lport),
            client=format_addr(ev.family, ev.raddr, ev.rport),
            netns=ev.netns,
            first_ns=ev.ts_ns,
            last_ns=ev.ts_ns,
            lingering_state=self._state(ev.oldstate),
            closewait={
                "skaddr": ev.skaddr,
                "inode": ev.sk_ino or None,
                "snd_nxt": ev.seq,
                "rcv_nxt": ev.ack,
                "age_s": age_s,
                "age_source": age_source,
            },
            events=[ev],
        )
        inc.closewait["unread_bytes"] = ev.unread
        self._mark_new(inc, ev.ts_ns)
        self.next_id += 1
        inc.repeat_of = self._earlier(inc)
        inc.add("syn", ev.ts_ns)
        self._challenge_from_syn(inc, ev, None)
        self._opened(inc)
        return done

    def _challenge_from_syn(self, inc: Incident, ev: Event, retry: Step | None) -> None:
        """Without a challenge hook, the SYN event says whether the ACK went out."""
        if ev.has("TC_F_CHALLENGE_SEEN"):
            inc.challenges_pending += 1
            return  # a TC_EV_CHALLENGE_ACK event follows
        sent = ev.has("TC_F_CHALLENGE_PASSED")
        if retry is not None:
            retry.detail["challenge_ack_sent"] = sent
        if sent:
            inc.challenges_sent += 1
            inc.add("challenge_ack", ev.ts_ns, seq=ev.seq, ack=ev.ack)
        else:
            inc.challenges_limited += 1

    def _earlier(self, inc: Incident) -> dict | None:
        """An earlier incident on the same lingering socket, or on the same
        connection tuple (a new lingering socket, the same port again)."""
        same_socket = (self.recent_sockets.get((inc.netns, inc.closewait["skaddr"], inc.key)) if inc.seen_server
                       else None)
        if same_socket is not None:
            return {"id": same_socket, "same": "socket"}
        same_tuple = self.recent_tuples.get((inc.home_netns, inc.key))
        if same_tuple is not None:
            return {"id": same_tuple, "same": "port"}
        return None

    def _last_unresolved_retry(self, inc: Incident) -> Step | None:
        for s in reversed(inc.steps):
            if s.name == "retry_syn":
                return None if "reached" in s.detail else s
        return None

    def _on_rst_sent(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        if local_is_server or self._state(ev.oldstate) != "SYN_SENT":
            return  # only the client's answer to the challenge ACK matters
        inc.client_netns = ev.netns
        inc.seen_client = True
        inc.client_sk = inc.client_sk or ev.skaddr
        rst = inc.step("rst")
        if rst is None:
            inc.add("rst", ev.ts_ns, seq=ev.seq, in_window=ev.seq == inc.closewait["rcv_nxt"], seen_at="client")
        elif rst.detail.get("seen_at") == "server":
            self._rst_sent_after_received(inc, rst, ev.ts_ns, ev.seq)

    def _rst_sent_after_received(self, inc: Incident, rst: Step, sent_ns: int, seq: int) -> None:
        """The client's RST, its send streamed after the server's receipt of
        it (two tracers' stamps of the two ends, microseconds apart, can come
        in either order): the step it would have been in the other order, so
        that a joined report does not depend on it. The step is the client's
        send; the server's receipt is `received_ms`."""
        received_ms = round((rst.ts_ns - inc.first_ns) / 1e6, 3)
        rst.ts_ns = sent_ns
        rst.detail = {"seq": seq, "in_window": seq == inc.closewait["rcv_nxt"], "seen_at": "client",
                      "received_ms": received_ms}

    def _on_rst_received(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        if not local_is_server or ev.skaddr != inc.closewait["skaddr"]:
            return
        rst = inc.step("rst")
        if rst is None:
            inc.add("rst", ev.ts_ns, seen_at="server")
        else:
            rst.detail["received_ms"] = round((ev.ts_ns - inc.first_ns) / 1e6, 3)
        old = self._state(ev.oldstate)  # the state when the RST came
        if old != "CLOSE" and not inc.has("closewait_closed"):
            # tcp_reset() ends in tcp_done(): the socket is closed now, whether
            # or not the state hook sees it (it may not be attached yet)
            inc.add("closewait_closed", ev.ts_ns, from_state=old)

    def _on_retransmit(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        if local_is_server or inc.has("established"):
            return
        inc.client_netns = ev.netns
        attempts = sum(1 for s in inc.steps if s.name == "retry_syn")
        inc.add("retry_syn", ev.ts_ns, attempt=attempts + 1)

    def _on_challenge_ack(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        """tcp_send_challenge_ack() returned (fentry/kprobe backends)."""
        if not local_is_server or ev.skaddr != inc.closewait["skaddr"]:
            return
        inc.challenges_pending = max(0, inc.challenges_pending - 1)
        if ev.has("TC_F_CHALLENGE_PASSED"):
            inc.challenges_sent += 1
            received = next((s for s in inc.steps if s.name == "challenge_ack" and s.detail.get("seen_at") == "client"),
                            None)
            if received is not None and inc.challenges_sent <= inc.challenges_received:
                # the client's receipt of this very ACK was ordered first (another CPU's stamp): one step, the send's
                got = {"received_seq": received.detail["seq"], "received_ack": received.detail["ack"],
                       "matches_server": (received.detail["seq"], received.detail["ack"]) == (ev.seq, ev.ack),
                       "received_ms": round((received.ts_ns - inc.first_ns) / 1e6, 3)}
                received.ts_ns = ev.ts_ns
                received.detail = {"seq": ev.seq, "ack": ev.ack, **got}
            else:
                inc.add("challenge_ack", ev.ts_ns, seq=ev.seq, ack=ev.ack)
        else:
            inc.challenges_limited += 1

    def _on_queued(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        if not inc.has("queued"):
            # the queued child is the retried SYN's connection: when no end saw
            # the retry itself (a server-only view), it reached the listener by now
            self._retry_reached_listener(inc, ev)
            inc.add("queued", ev.ts_ns, backlog=ev.backlog, max_backlog=ev.max_backlog)

    def _on_state(self, inc: Incident, ev: Event, local_is_server: bool) -> None:
        old, new = self._state(ev.oldstate), self._state(ev.newstate)
        if local_is_server and ev.skaddr == inc.closewait["skaddr"]:
            if new == "CLOSE" and not inc.has("closewait_closed"):
                inc.add("closewait_closed", ev.ts_ns, from_state=old)
            elif new != "CLOSE" and not inc.has("server_closed"):
                # its application called close() meanwhile (CLOSE_WAIT -> LAST_ACK)
                inc.add("server_closed", ev.ts_ns, from_state=old, to_state=new)
            return
        if not local_is_server and old == "SYN_SENT" and new == "CLOSE":
            inc.client_netns = ev.netns
            if not inc.has("client_closed"):
                inc.add("client_closed", ev.ts_ns)
            return
        if local_is_server and old == "LISTEN" and new == "SYN_RECV":
            self._retry_reached_listener(inc, ev)
            return
        end = "server" if local_is_server else "client"
        if old == "ESTABLISHED" and end not in inc.established_ends:
            # this end left ESTABLISHED without its arrival there being seen:
            # it arrived while the lazy state hook was detached, or the kernel
            # did not run the programs for its retry (a run skipped because it
            # fired while a BPF program ran on that CPU: recursion_misses,
            # marked runs_skipped when the count comes; or, on some virtual
            # machines, never called in a softirq that runs on top of certain
            # threads, with no count at all). It was established, when is not
            # known; what was seen is said, not a cause.
            inc.mark_incomplete("state_hook_off" if self._state_blind(inc.first_ns) else "arrival_unseen")
            inc.established_ends.add(end)
            if not inc.has("established"):
                inc.add("established", ev.ts_ns, seen_by="state_change", end=end,
                        by_ms=round((ev.ts_ns - inc.first_ns) / 1e6, 3))
                self._due = min(self._due, self._deadline(inc))
            return
        if new != "ESTABLISHED" or old not in ("SYN_SENT", "SYN_RECV"):
            return
        if not local_is_server:
            inc.client_netns = ev.netns
        inc.established_ends.add(end)
        est = inc.step("established")
        if est is None:
            inc.add("established", ev.ts_ns, end=end)
            self._due = min(self._due, self._deadline(inc))
        else:
            est.detail[f"{end}_ms"] = round((ev.ts_ns - inc.first_ns) / 1e6, 3)
        if not local_is_server and not inc.seen_server:
            # a SYN-ACK answered the client: its last SYN reached a listener
            retry = self._last_unresolved_retry(inc)
            if retry is not None:
                retry.detail["reached"] = "listener"
        if local_is_server:
            self._retry_reached_listener(inc, ev)
            if not inc.has("queued"):
                # tcp_child_process() moves a child to ESTABLISHED only after
                # inet_csk_complete_hashdance() queued it on the listener
                inc.add("queued", ev.ts_ns, evidence="child established")

    def _retry_reached_listener(self, inc: Incident, ev: Event) -> None:
        retry = self._last_unresolved_retry(inc)
        if retry is None and not any(s.name == "retry_syn" for s in inc.steps):
            retry = inc.add("retry_syn", ev.ts_ns, attempt=1, seen_at="server")
        if retry is not None:
            retry.detail["reached"] = "listener"

    # -- the client's end ------------------------------------------------------

    def _on_client_challenged(self, ev: Event) -> list[Incident]:
        """The client's SYN-SENT socket reset a bare ACK that did not
        acknowledge its SYN: a challenge ACK from a remote socket that still
        holds the tuple (the client's view of a collision)."""
        key = _key(ev, False)
        done: list[Incident] = []
        inc = self.open.get(key)
        if inc is not None and inc.seen_client and inc.client_sk not in (None, ev.skaddr):
            # a new connecting socket on the same tuple: a new attempt, a new incident
            done.append(self._close(inc, "superseded"))
            inc = None
        if inc is None:
            inc = self._twin(ev, "client")
            if inc is not None:
                self._join(inc, key, False)
        if inc is not None:
            if len(inc.events) < self.raw_events:
                inc.events.append(ev)
            inc.last_ns = ev.ts_ns
            again = inc.seen_client and inc.challenges_received > 0
            self._client_evidence(inc, ev)
            if again and not inc.seen_server:
                # the client's retried SYN met the old connection again
                inc.syn_hits += 1
                retry = self._last_unresolved_retry(inc)
                if retry is None:
                    retry = inc.add("retry_syn", ev.ts_ns, attempt=inc.syn_hits - 1, seen_at="client")
                retry.detail["reached"] = "lingering socket"
                inc.add("challenge_ack", ev.ts_ns, seq=ev.seq, ack=ev.ack, seen_at="client")
            return done
        self._make_room(done)
        syn_ns = ev.ts_ns - ev.syn_age_ns if ev.has("TC_F_SYN_STAMP") else None
        first = syn_ns if syn_ns is not None else ev.ts_ns
        inc = Incident(
            id=self.next_id,
            key=key,
            family=ev.family,
            server=format_addr(ev.family, ev.raddr, ev.rport),
            client=format_addr(ev.family, ev.laddr, ev.lport),
            netns=None,
            first_ns=first,
            last_ns=ev.ts_ns,
            lingering_state=None,
            closewait={
                "skaddr": None,
                "inode": None,
                "snd_nxt": ev.seq,  # as the challenge ACK carried them
                "rcv_nxt": ev.ack,
                "age_s": None,
                "age_source": "unknown",
                "unread_bytes": None,
            },
            events=[ev],
            seen_server=False,
        )
        self._mark_new(inc, ev.ts_ns)  # its server end's events may be the ones lost
        self.next_id += 1
        self._client_evidence(inc, ev)
        inc.repeat_of = self._earlier(inc)
        if syn_ns is not None:
            inc.add("syn", syn_ns, seen_at="client", sent=True)
        inc.add("challenge_ack", ev.ts_ns, seq=ev.seq, ack=ev.ack, seen_at="client")
        self._opened(inc)
        return done

    def _client_evidence(self, inc: Incident, ev: Event) -> None:
        """What the client's challenged SYN tells, on any incident."""
        inc.seen_client = True
        inc.client_netns = ev.netns
        inc.client_sk = ev.skaddr
        inc.client_inode = inc.client_inode or ev.sk_ino or None
        inc.challenges_received += 1
        if ev.conn_pid and inc.client_process is None:
            inc.client_process = {"pid": ev.conn_pid, "comm": ev.conn_comm}
        if ev.has("TC_F_SYN_STAMP") and inc.client_syn_ns is None:
            inc.client_syn_ns = ev.ts_ns - ev.syn_age_ns
        ack = {"received_seq": ev.seq, "received_ack": ev.ack}
        if inc.seen_server:
            # the numbers the server sent, as the client got them: equal unless a middlebox rewrote them
            ack["matches_server"] = ev.seq == inc.closewait["snd_nxt"] and ev.ack == inc.closewait["rcv_nxt"]
            for s in inc.steps:
                if s.name == "challenge_ack" and "received_seq" not in s.detail:
                    s.detail.update(ack, received_ms=round((ev.ts_ns - inc.first_ns) / 1e6, 3))
                    break
            else:  # the server's side did not see it go out (tracepoint: the limiter's stamp missed it)
                inc.add("challenge_ack", ev.ts_ns, seq=ev.seq, ack=ev.ack, seen_at="client")
        rst = inc.step("rst")
        if rst is None:
            in_window = ev.ack == inc.closewait["rcv_nxt"] if inc.seen_server else None
            inc.add("rst", ev.ts_ns, seq=ev.ack, in_window=in_window, seen_at="client")
        elif rst.detail.get("seen_at") == "server":
            self._rst_sent_after_received(inc, rst, ev.ts_ns, ev.ack)

    def _adopt_server(self, inc: Incident, ev: Event) -> None:
        """The server end's SYN_CHALLENGED for an incident the client's end
        started: the lingering socket is known now."""
        age_s, age_source = self._age(ev)
        inc.seen_server = True
        inc.netns = ev.netns
        inc.lingering_state = self._state(ev.oldstate)
        if self._by_numbers.get(_numbers(inc)) is inc:  # indexed again by the numbers as sent
            del self._by_numbers[_numbers(inc)]
        inc.closewait.update(skaddr=ev.skaddr, inode=ev.sk_ino or None, snd_nxt=ev.seq, rcv_nxt=ev.ack,
                             age_s=age_s, age_source=age_source, unread_bytes=ev.unread)
        self._by_numbers[_numbers(inc)] = inc
        inc.last_ns = ev.ts_ns
        if len(inc.events) < self.raw_events:
            inc.events.append(ev)
        received = [st for st in inc.steps if st.name == "challenge_ack" and st.detail.get("seen_at") == "client"]
        inc.steps = [st for st in inc.steps if st not in received]
        self._challenge_from_syn(inc, ev, None)
        if received:  # the client's first challenge ACK: the one the server's side reports now, as received
            first = received[0]
            got = {"received_seq": first.detail["seq"], "received_ack": first.detail["ack"],
                   "matches_server": (first.detail["seq"], first.detail["ack"]) == (ev.seq, ev.ack),
                   "received_ms": round((first.ts_ns - inc.first_ns) / 1e6, 3)}
            sent = inc.step("challenge_ack")
            if sent is not None:
                sent.detail.update(got)
            else:
                first.detail.update(got)
                inc.steps.append(first)
        rst = inc.step("rst")
        if rst is not None and rst.detail.get("in_window") is None:
            rst.detail["in_window"] = rst.detail.get("seq") == ev.ack

    # -- completion ----------------------------------------------------------

    def _complete(self, inc: Incident) -> bool:
        """Complete once every traced end is established (and the child queued),
        or the client gave up; tick() closes, after a grace period, the ones
        whose other end is not seen."""
        if inc.has("client_closed") and not inc.has("established"):
            return True
        if not inc.seen_server:  # only the client's end is traced
            return "client" in inc.established_ends
        return (
            inc.has("queued")
            and "server" in inc.established_ends
            and ("client" in inc.established_ends or inc.client_netns is None)
        )

    def _close(self, inc: Incident, why: str) -> Incident:
        if inc.challenges_pending:
            # the challenge hook did not report every challenged SYN: the client's receipts prove the sends
            inc.challenges_sent += min(inc.challenges_pending, max(0, inc.challenges_received - inc.challenges_sent))
            inc.mark_incomplete("event_missed")
        for key in inc.keys:
            if self.open.get(key) is inc:
                del self.open[key]
        if self._by_numbers.get(_numbers(inc)) is inc:
            del self._by_numbers[_numbers(inc)]
        inc.ended_by = why
        if inc.skips_near and not self._complete(inc):
            inc.mark_incomplete("runs_skipped")
        if not inc.has("established") and self._state_blind(inc.first_ns):
            inc.mark_incomplete("state_hook_off")  # its establishment may have come before the hook was back
        inc.sort_steps()
        inc.outcome, inc.outcome_detail = self._outcome(inc)
        self._remember(inc)
        return inc

    def confirm(self, inc: Incident, connection: dict) -> None:
        """The host's look at an ended incident's tuple, for one whose
        establishment may have gone unseen (may_have_missed_establishment:
        the state hook was away, events were lost, runs skipped, its tracking
        evicted): the states of the sockets on it at each end (`server`,
        `client`: lists, None if not asked) at `at_ns`. A socket in a state
        that only the new connection can be in proves it was established by
        then: the incident is recovered, when is not known (the established
        step says it was seen by sock_diag). Where the state hook was away,
        that was all it missed (state_hook_off becomes established_unseen);
        any other reason stays, since other steps may be missing too."""
        if not inc.may_have_missed_establishment:
            return
        proof = {"server": set(ESTABLISHED_SINCE["server"]), "client": set(ESTABLISHED_SINCE["client"])}
        if not inc.has("closewait_closed"):  # the old socket may still be there, in one of these
            proof["server"] -= set(LINGERING_NEXT.get(inc.lingering_state, ESTABLISHED_SINCE["server"][1:]))
        found = {}
        for end in ("server", "client"):
            st = next((st for st in connection.get(end) or () if st in proof[end]), None)
            if st is not None:
                found[end] = st
        if not found:
            return
        at_ns = connection["at_ns"]
        inc.established_ends |= set(found)
        inc.add("established", at_ns, seen_by="sock_diag", by_ms=round((at_ns - inc.first_ns) / 1e6, 3),
                **{f"{end}_state": st for end, st in found.items()})
        if "state_hook_off" in inc.incomplete_reasons:
            inc.incomplete_reasons[inc.incomplete_reasons.index("state_hook_off")] = "established_unseen"
        inc.sort_steps()
        inc.stuck_reason = None
        inc.outcome, inc.outcome_detail = self._outcome(inc)

    def _outcome(self, inc: Incident) -> tuple[str, str]:
        if inc.established_unseen:
            return "recovered", "recovered_unseen"
        if inc.has("established"):
            fast = inc.penalty_ns is not None and inc.penalty_ns < FAST_RETRY_NS
            return "recovered", "recovered_fast" if fast else "recovered_after_rto"
        knocking = inc.syn_hits > 1 or (not inc.has("rst") and any(s.name == "retry_syn" for s in inc.steps))
        if knocking:
            if inc.has("rst"):
                inc.stuck_reason = "stuck"
            elif inc.challenges_limited:
                inc.stuck_reason = "stuck_rate_limited"
            elif inc.challenges_sent:
                inc.stuck_reason = "stuck_challenge_ack_lost"
            else:
                inc.stuck_reason = "stuck"
        if inc.has("client_closed"):
            return "gave_up", "client_gave_up"
        if inc.stuck_reason:
            return "stuck", inc.stuck_reason
        return "pending", "pending"

    def _make_room(self, done: list[Incident]) -> None:
        """Bounded memory: at max_open, the oldest open incident gives way."""
        if len(self.open) >= self.max_open:
            oldest = min(self.open.values(), key=lambda i: i.first_ns)
            done.append(self._close(oldest, "evicted"))

    def _remember(self, inc: Incident) -> None:
        if inc.translated is None:
            tables = [(self.recent_tuples, (inc.home_netns, inc.key))]
        else:  # each end's namespace with the tuple it sees
            tables = [(self.recent_tuples, (inc.netns, inc.translated["after"])),
                      (self.recent_tuples, (inc.client_netns, inc.translated["before"]))]
        if inc.seen_server:
            server_key = inc.key if inc.translated is None else inc.translated["after"]
            tables.append((self.recent_sockets, (inc.netns, inc.closewait["skaddr"], server_key)))
        for table, key in tables:
            table[key] = inc.id
            table.move_to_end(key)
            while len(table) > RECENT:
                table.popitem(last=False)


# The handler of each event type (bpf/tcpcollide.h, enum tc_event_type), in
# two kinds. A start handler takes the event alone: it opens an incident, or
# joins the one of its tuple. A step handler takes the open incident of the
# event's tuple (events on no open incident are ignored before it is called).
START_HANDLERS = {
    "syn_challenged": Correlator._on_syn_challenged,
    "client_challenged": Correlator._on_client_challenged,
}
STEP_HANDLERS = {
    "rst_sent": Correlator._on_rst_sent,
    "rst_received": Correlator._on_rst_received,
    "state": Correlator._on_state,
    "retransmit": Correlator._on_retransmit,
    "queued": Correlator._on_queued,
    "challenge_ack": Correlator._on_challenge_ack,
}


def _numbers(inc: Incident) -> tuple[int, int, int]:
    return inc.family, inc.closewait["snd_nxt"], inc.closewait["rcv_nxt"]


class HandlerTableError(Exception):
    """The handler table and the header's event types disagree."""


def check_handlers(event_types, start_handlers, step_handlers) -> None:
    """Every event type of the header has exactly one handler, and every
    handler is for a type the header has: a renamed, added or removed event
    type fails here, at import, instead of switching a handler off."""
    types, start, step = set(event_types), set(start_handlers), set(step_handlers)
    problems = []
    if start & step:
        problems.append(f"both a start and a step handler: {', '.join(sorted(start & step))}")
    if types - start - step:
        problems.append(f"event types without a handler: {', '.join(sorted(types - start - step))}")
    if (start | step) - types:
        problems.append(f"handlers for event types bpf/tcpcollide.h does not have: "
                        f"{', '.join(sorted((start | step) - types))}")
    if problems:
        raise HandlerTableError("correlator: " + "; ".join(problems))


check_handlers(EVENT_TYPES.values(), START_HANDLERS, STEP_HANDLERS)
