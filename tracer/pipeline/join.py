"""Joining recordings made on different hosts: `replay client.rec server.rec`.

When the client and the server of a collision are two hosts, each host's
tracer sees one end: the client's (its SYN, the challenge ACK it received,
its RST, its retries, its process) or the server's (the lingering socket, its
owner, the listener's queue). A join replays the recordings as one stream,
so the one correlator meets both ends of each collision in one incident,
`view: "both"`, exactly as a tracer seeing both ends live would.

Two steps:

1. Each recording is replayed alone (tracer/pipeline/replay.py), to know its
   incidents and what its host found out about each (the context frames).
   The clocks are aligned on the collisions seen at both ends: the same
   tuple, and the challenge ACK's numbers (the lingering socket's snd_nxt and
   rcv_nxt as the server sent them, as the client received them). The server
   sent the challenge at s1 and received the client's RST at s2 (its clock);
   the client received the challenge and answered at c1 (its clock), so the
   client's clock is ahead of the server's by c1 - (s1 + s2) / 2, give or
   take (s2 - s1) / 2, as NTP reasons about one exchange; the collision with
   the shortest exchange gives the shift. Two recordings of one boot of one
   kernel (the same boot id) share its clock: nothing is shifted. With no
   collision seen at both ends, the hosts' wall clocks align them.
2. The recordings' frames are merged in kernel-time order, each recording's
   times shifted onto the first one's clock, and fed to one pipeline. Each
   incident's host context is joined from the incidents of step 1 on its
   tuple: the server end's (owners, listener) and the client end's (the
   connecting process). Every collision record says which recordings saw it
   and the clock shift applied (`joined`); the summary says the alignment of
   each recording.

What cannot be joined exactly is said, not guessed:
- the lazy state hook of each tracer: the joined stream counts the hook as
  away whenever any recording's was (an incident never seen established
  while any was away is incomplete, `state_hook_off`);
- a recording cut short: the incidents open where it ends are marked
  `recording_cut`, whichever host they are of;
- the kernel's counts are summed over the recordings (each host counts the
  collisions of its own server ends).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tracer.pipeline.filters import Filters
from tracer.pipeline import recording
from tracer.pipeline.correlator import Correlator, Incident, Key, Settings
from tracer.pipeline.events import decode
from tracer.pipeline.flow import NoHost, Pipeline, RecordedHost, selected
from tracer.pipeline.records import Clock
from tracer.pipeline.replay import UNTIMED, ReplayError, apply_untimed, open_recording, replay, replay_one

MATCH_SLACK_NS = 1_000_000_000  # an incident of one recording belongs to a joined one it overlaps within this


@dataclass
class Alignment:
    """How one recording's kernel times were put on the first recording's clock."""

    path: str
    shift_ns: int = 0  # added to this recording's times
    basis: str = "reference"  # "reference" (the first), "same_clock", "matched", "wall_clock"
    uncertainty_ns: int | None = 0  # the shift is right within this (None: not known)
    matched: int = 0  # collisions seen at both ends, between this recording and the first

    def as_dict(self) -> dict:
        return {"basis": self.basis, "shift_ms": round(self.shift_ns / 1e6, 3),
                "uncertainty_ms": None if self.uncertainty_ns is None else round(self.uncertainty_ns / 1e6, 3),
                "matched": self.matched}


@dataclass
class Seen:
    """An incident of one recording replayed alone, and its host context."""

    source: int
    incident: Incident
    context: dict | None
    taken: bool = False


class _Capturing(RecordedHost):
    """A solo replay's host that keeps every incident with its context."""

    def __init__(self, source: int):
        super().__init__()
        self.source = source
        self.seen: list[Seen] = []

    def context(self, inc: Incident) -> dict | None:
        ctx = super().context(inc)
        self.seen.append(Seen(self.source, inc, ctx))
        return ctx


# -- the clocks ---------------------------------------------------------------------

def _server_exchange(inc: Incident) -> tuple[int, int] | None:
    """(challenge ACK sent, RST received) at a server end seen alone."""
    if not inc.seen_server or inc.seen_client:
        return None
    sent = next((s.ts_ns for s in inc.steps if s.name == "challenge_ack"), None)
    rst = next((s.ts_ns for s in inc.steps if s.name == "rst" and s.detail.get("seen_at") == "server"), None)
    if sent is None or rst is None or rst < sent:
        return None
    return sent, rst


def _client_exchange(inc: Incident) -> int | None:
    """When a client end seen alone received the challenge ACK (and answered it)."""
    if not inc.seen_client or inc.seen_server:
        return None
    return next((s.ts_ns for s in inc.steps if s.name == "challenge_ack" and s.detail.get("seen_at") == "client"),
                None)


def _numbers(inc: Incident) -> tuple[int, int, int]:
    """A collision's identity across hosts: the challenge ACK's seq/ack (as the
    server sent them, as the client received them), not its tuple: a NAT
    between the hosts shows each end another tuple, and rewrites no sequence
    numbers."""
    return inc.family, inc.closewait["snd_nxt"], inc.closewait["rcv_nxt"]


def estimate_shift(reference: list[Incident], other: list[Incident]) -> tuple[int, int, int] | None:
    """The shift to add to `other`'s kernel times to put them on `reference`'s
    clock, its uncertainty, and how many collisions were seen at both ends
    (None: none was). Pure: incidents of solo replays in, numbers out."""
    def index(incidents: list[Incident]):
        servers: dict[tuple, list[tuple[int, int]]] = {}
        clients: dict[tuple, list[int]] = {}
        for inc in incidents:
            exchange = _server_exchange(inc)
            if exchange is not None:
                servers.setdefault(_numbers(inc), []).append(exchange)
            received = _client_exchange(inc)
            if received is not None:
                clients.setdefault(_numbers(inc), []).append(received)
        return servers, clients

    ref_servers, ref_clients = index(reference)
    other_servers, other_clients = index(other)
    samples: list[tuple[int, int]] = []  # (round trip, shift)
    # the reference is the server (other = client: shift = -(client - server)), and the other way round
    for servers, clients, sign in ((ref_servers, other_clients, -1), (other_servers, ref_clients, 1)):
        for numbers, exchanges in servers.items():
            received = clients.get(numbers)
            if not received:
                continue
            for (sent, rst), c1 in zip(sorted(exchanges), sorted(received)):
                samples.append((rst - sent, sign * (c1 - (sent + rst) // 2)))
    if not samples:
        return None
    round_trip, shift = min(samples)
    return shift, (round_trip + 1) // 2, len(samples)


def align(heads: list[dict], paths: list[str], seen: list[list[Seen]]) -> list[Alignment]:
    ref = heads[0]
    out = [Alignment(paths[0])]
    for i in range(1, len(heads)):
        head = heads[i]
        estimate = estimate_shift([s.incident for s in seen[0]], [s.incident for s in seen[i]])
        matched = estimate[2] if estimate else 0
        if head.get("boot_id") and head.get("boot_id") == ref.get("boot_id"):
            out.append(Alignment(paths[i], 0, "same_clock", 0, matched))
        elif estimate is not None:
            out.append(Alignment(paths[i], estimate[0], "matched", estimate[1], matched))
        else:  # wall = monotonic + offset on each host
            out.append(Alignment(paths[i], head["clock_offset_ns"] - ref["clock_offset_ns"], "wall_clock", None, 0))
    return out


# -- the host contexts ------------------------------------------------------------

class JoinedHost(NoHost):
    """A join's host: each incident's context from the solo incidents on its
    tuple that overlap it, the server end's and the client end's."""

    def __init__(self, seen: list[list[Seen]], alignments: list[Alignment],
                 select: Callable[[list[dict]], str | None] | None = None):
        self.alignments = alignments
        self.select = select
        self.by_key: dict[Key, list[Seen]] = {}
        for per_source in seen:
            for s in per_source:
                for key in s.incident.keys:
                    self.by_key.setdefault(key, []).append(s)
        self.sources: dict[int, list[int]] = {}  # joined incident id -> the recordings it was seen in

    def _shifted(self, s: Seen, ns: int) -> int:
        return ns + self.alignments[s.source].shift_ns

    def _part(self, inc: Incident, end: str) -> Seen | None:
        best = None
        for s in (s for key in inc.keys for s in self.by_key.get(key, ())):
            if s.taken or not (s.incident.seen_server if end == "server" else s.incident.seen_client):
                continue
            first, last = self._shifted(s, s.incident.first_ns), self._shifted(s, s.incident.last_ns)
            if first > inc.last_ns + MATCH_SLACK_NS or last < inc.first_ns - MATCH_SLACK_NS:
                continue
            if best is None or abs(first - inc.first_ns) < abs(self._shifted(best, best.incident.first_ns)
                                                                - inc.first_ns):
                best = s
        return best

    def context(self, inc: Incident) -> dict | None:
        return selected(self._joined_context(inc), self.select)

    def _joined_context(self, inc: Incident) -> dict | None:
        server = self._part(inc, "server") if inc.seen_server else None
        if server is not None:
            server.taken = True
        if server is not None and server.incident.seen_client:
            client = server  # one host saw both ends itself
        else:
            client = self._part(inc, "client") if inc.seen_client else None
        if client is not None:
            client.taken = True
        parts = [p for p in (server, client) if p is not None]
        self.sources[inc.id] = sorted({p.source for p in parts})
        if not parts:
            return None
        if len(parts) == 1 or parts[0] is parts[1]:
            return self._with_shifted_connection(parts[0], parts[0].context)
        sctx, cctx = server.context or {}, client.context or {}
        ctx = {k: v for k, v in sctx.items() if k not in ("client_process", "connection")}
        found = [c["conntrack"] for c in (sctx, cctx) if c.get("conntrack")]
        if found:  # the host that translates it (either end's, or neither)
            ctx["conntrack"] = next((c for c in found if c.get("entry")), found[0])
        if "client_process" in cctx or "client_process" in sctx:
            ctx["client_process"] = cctx.get("client_process") or sctx.get("client_process")
        sconn = self._with_shifted_connection(server, sctx).get("connection") if "connection" in sctx else None
        cconn = self._with_shifted_connection(client, cctx).get("connection") if "connection" in cctx else None
        if sconn or cconn:
            ctx["connection"] = {"server": (sconn or {}).get("server"), "client": (cconn or {}).get("client"),
                                 "at_ns": max(c["at_ns"] for c in (sconn, cconn) if c)}
        return ctx

    def _with_shifted_connection(self, part: Seen, ctx: dict | None) -> dict | None:
        if not ctx or not isinstance(ctx.get("connection"), dict):
            return ctx
        conn = dict(ctx["connection"])
        conn["at_ns"] = self._shifted(part, conn["at_ns"])
        return {**ctx, "connection": conn}


# -- the merged stream ------------------------------------------------------------

CUT = -1  # a pseudo frame kind: the recording ends here, damaged
TWIN_NS = 1_000_000  # two recordings' stamps of one kernel event are microseconds apart


class Twins:
    """Kernel events that two recordings of one host both hold (two tracers
    whose filters overlap): fed once. The same event is the same socket,
    tuple, numbers and states, stamped by the other tracer's program within
    TWIN_NS; two hosts' events never are (other namespaces, other sockets)."""

    def __init__(self):
        self.recent: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # event -> (recording, time)
        self.dropped = 0

    def seen(self, source: int, ev) -> bool:
        while self.recent and next(iter(self.recent.values()))[1] < ev.ts_ns - TWIN_NS:
            self.recent.popitem(last=False)
        key = (ev.type, ev.netns, ev.skaddr, ev.lport, ev.rport, ev.seq, ev.ack, ev.oldstate, ev.newstate)
        other = self.recent.get(key)
        if other is not None and other[0] != source:
            self.dropped += 1
            return True
        self.recent[key] = (source, ev.ts_ns)
        self.recent.move_to_end(key)
        return False


@dataclass(order=True)
class _Item:
    at_ns: int
    source: int
    n: int
    kind: int = field(compare=False)
    value: object = field(compare=False)


def _items(source: int, path: str, shift_ns: int, filters: Filters) -> Iterator[_Item]:
    """A recording's frames in its order, each with the time that orders it
    among the other recordings' on the reference clock: an event's or a
    tick's own (never earlier than the frame before), the frame before's
    for the others."""
    f, _ = open_recording(path)
    with f:
        at = None
        n = 0
        try:
            for fr in recording.frames(f, f.tell()):
                kind, value = fr.kind, None
                if kind == recording.EVENT:
                    ev = decode(fr.payload)
                    if not filters.passes(ev):
                        continue
                    value = dataclasses.replace(ev, ts_ns=ev.ts_ns + shift_ns, raw=b"")
                    t = value.ts_ns
                elif kind == recording.TICK:
                    value = t = fr.u64() + shift_ns
                elif kind == recording.STATE_HOOK:
                    # written as the hook came or went, before the events that brought it were
                    # ordered and fed: its place in the recording, not its time, orders it
                    doc = fr.json()
                    value = (doc["attached"], doc["at_ns"] + shift_ns)
                    t = at if at is not None else 0
                elif kind in (recording.CONTEXT, recording.FLUSH, recording.END):
                    continue  # contexts: JoinedHost; the end: one flush for all
                else:  # UNTIMED
                    value = fr
                    t = at if at is not None else 0
                at = t if at is None else max(at, t)
                n += 1
                yield _Item(at, source, n, kind, value)
        except recording.RecordingError:
            yield _Item(at or 0, source, n + 1, CUT, None)


def replay_recordings(paths: list[str], sink: Callable[[dict], None], verbose: bool = False,
                      all_events: bool = False, filters: Filters | None = None,
                      select: Callable[[list[dict]], str | None] | None = None) -> dict:
    """`replay FILE...`: one recording replayed (tracer/pipeline/replay.py), several joined."""
    if len(paths) == 1:
        return replay(paths[0], sink, verbose, all_events, filters or Filters(), select)
    return replay_joined(paths, sink, verbose, all_events, filters, select)


def replay_joined(paths: list[str], sink: Callable[[dict], None], verbose: bool = False, all_events: bool = False,
                  filters: Filters | None = None, select: Callable[[list[dict]], str | None] | None = None) -> dict:
    filters = filters or Filters()
    heads = []
    for path in paths:
        f, head = open_recording(path)
        f.close()
        heads.append(head)
    states = heads[0]["tcp_states"]
    if any(h["tcp_states"] != states for h in heads[1:]):
        raise ReplayError(f"{', '.join(paths)}: the kernels number TCP states differently: cannot join")
    # 1. each alone: its incidents, their contexts, its end
    seen: list[list[Seen]] = []
    solo: list[dict] = []
    errors: list[str] = []
    for i, path in enumerate(paths):
        host = _Capturing(i)
        rec, error = replay_one(path, lambda _rec: None, filters=filters, host=host)
        seen.append(host.seen)
        solo.append(rec)
        if error is not None:
            errors.append(error)
    alignments = align(heads, paths, seen)
    # 2. together
    hz = heads[0].get("hz") if all(h.get("hz") == heads[0].get("hz") for h in heads) else None
    backends = sorted({h["backend"] for h in heads})
    host = JoinedHost(seen, alignments, select)
    pipeline = Pipeline(Correlator(states, hz, Settings.from_header(heads[0])), Clock(heads[0]["clock_offset_ns"]),
                        "+".join(backends), _marking(sink, host, paths), host=host, verbose=verbose,
                        all_events=all_events)
    hooks = [True] * len(paths)  # each tracer's state hook, as its recording says (attached at the start)
    twins = Twins()
    for item in heapq.merge(*(_items(i, p, a.shift_ns, filters) for i, (p, a) in enumerate(zip(paths, alignments)))):
        if item.kind == recording.EVENT:
            if not twins.seen(item.source, item.value):
                pipeline.feed(item.value)
        elif item.kind == recording.TICK:
            pipeline.tick(item.value)
        elif item.kind == recording.STATE_HOOK:
            before = all(hooks)
            hooks[item.source] = item.value[0]
            if all(hooks) != before:  # away whenever any tracer's was
                pipeline.state_hook(all(hooks), item.value[1])
        elif item.kind in UNTIMED:
            apply_untimed(pipeline, item.value, filters)
        elif item.kind == CUT:
            pipeline.correlator.cut()
        pipeline.release()
    pipeline.flush()
    pipeline.release(force=True)
    pipeline.losses.undecodable = sum(r.get("undecodable_events") or 0 for r in solo)
    skipped = [r.get("skipped_runs") for r in solo if r.get("skipped_runs") is not None]
    pipeline.losses.skipped_runs = sum(skipped) if skipped else None
    joined = [{**r["replay_of"], "host": h.get("host"), "clock": a.as_dict(), "collisions_alone": r["collisions"],
               "stopped_by": r["stopped_by"]} for r, h, a in zip(solo, heads, alignments)]
    rec = pipeline.finish(" / ".join(r["stopped_by"] for r in solo), None, _summed_kernel(solo),
                          replay_of=joined[0], joined=joined, joined_duplicates=twins.dropped)
    if errors:
        raise ReplayError("; ".join(errors))
    return rec


def _marking(sink: Callable[[dict], None], host: JoinedHost, paths: list[str]) -> Callable[[dict], None]:
    """Each collision record says which recordings saw it and the clock
    shift its times got (the largest uncertainty of those shifted)."""
    def write(rec: dict) -> None:
        if rec.get("type") == "collision":
            sources = host.sources.get(rec["id"], [])
            shifted = [host.alignments[s] for s in sources if s != 0]
            rec["joined"] = {
                "recordings": [paths[s] for s in sources],
                "clock_basis": shifted[0].basis if shifted else "reference",
                "clock_shift_ms": round(shifted[0].shift_ns / 1e6, 3) if shifted else 0.0,
                "clock_uncertainty_ms": (None if any(a.uncertainty_ns is None for a in shifted)
                                         else round(max((a.uncertainty_ns for a in shifted), default=0) / 1e6, 3)),
            }
        sink(rec)
    return write


def _summed_kernel(solo: list[dict]) -> dict | None:
    """The kernels' counts, summed (each host counts the collisions of its own
    server ends), from each recording's replay alone; None unless every one
    has them (a recording made before 0.5, or replay filters)."""
    out: dict = {"by_server": []}
    for rec in solo:
        kernel = rec.get("kernel")
        if kernel is None:
            return None
        for k, v in kernel.items():
            if k == "by_server":
                out[k].extend(v)
            elif k not in ("reported", "unreported") and isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    out["by_server"].sort(key=lambda r: (-r.get("collisions", 0), -r.get("syn_hits", 0)))
    return out
