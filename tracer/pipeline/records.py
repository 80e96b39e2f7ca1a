"""The records the tracer writes: `ready`, `collision`, `summary`.

One home for the output schema (documented in docs/json-schema.md): the JSON
lines are these dicts, and the human-readable renderer draws from the same
dicts, so the two outputs cannot tell different stories.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from tracer import __version__
from tracer.pipeline.correlator import Incident
from tracer.pipeline.events import AF_INET6, FLAGS, Event
from tracer.pipeline import translation
from tracer.pipeline.explain import explain, short_name

SCHEMA_VERSION = 1
BY_SERVER_MAX = 20  # the busiest (network namespace, server port, lingering state) a record lists


@dataclass(frozen=True)
class Clock:
    """Kernel monotonic nanoseconds -> wall-clock time."""

    offset_ns: int  # wall - monotonic

    @classmethod
    def now(cls) -> Clock:
        return cls(time.time_ns() - time.monotonic_ns())

    def iso(self, mono_ns: int) -> str:
        wall = dt.datetime.fromtimestamp((mono_ns + self.offset_ns) / 1e9, dt.timezone.utc)
        return wall.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _rel_ms(inc: Incident, ns: int) -> float:
    return round((ns - inc.first_ns) / 1e6, 3)


# the backend each hook belongs to, by the prefix of its name (enum tc_hook)
_HOOK_BACKENDS = {"tp": "tracepoint", "kp": "kprobe", "fe": "fentry"}


def hook_backend(hook: str) -> str:
    return _HOOK_BACKENDS.get(hook.split("_", 1)[0], "unknown")


def event_record(ev: Event, first_ns: int | None = None, states: dict[int, str] | None = None) -> dict:
    """A raw kernel event, for --verbose and research. states: the kernel's
    TCP state numbering, to name the states as well."""
    rec = {
        "type": ev.type,
        "hook": ev.hook,
        "backend": hook_backend(ev.hook),
        "cpu": ev.cpu,
        "ts_ns": ev.ts_ns,
        "netns": ev.netns,
        "local": ev.local,
        "remote": ev.remote,
        "oldstate": ev.oldstate,
        "newstate": ev.newstate,
        "skaddr": f"{ev.skaddr:#x}",
        "sk_ino": ev.sk_ino or None,
        "seq": ev.seq,
        "ack": ev.ack,
        "flags": ev.flags,
        "flag_names": [name.removeprefix("TC_F_").lower() for name, bit in FLAGS.items() if ev.flags & bit],
        "age_ns": ev.syn_age_ns or ev.observed_age_ns,  # schema 1's name for both (docs/json-schema.md)
        "pid": ev.pid,
        "comm": ev.comm,
    }
    if states is not None:
        rec["oldstate_name"] = states.get(ev.oldstate, str(ev.oldstate))
        rec["newstate_name"] = states.get(ev.newstate, str(ev.newstate))
    if ev.conn_pid:
        rec["conn_pid"], rec["conn_comm"] = ev.conn_pid, ev.conn_comm
    if ev.type == "queued":
        rec["backlog"], rec["max_backlog"] = ev.backlog, ev.max_backlog
    if first_ns is not None:
        rec["t_ms"] = round((ev.ts_ns - first_ns) / 1e6, 3)
    return rec


def event_stream_record(ev: Event, clock: Clock, states: dict[int, str] | None = None) -> dict:
    """One kernel event as the BPF side emitted it (--all-events): an `event`
    record; `event` is the kernel event's type."""
    raw = event_record(ev, None, states)
    return {"type": "event", "event": raw.pop("type"), "time": clock.iso(ev.ts_ns), **raw}


def collision_record(inc: Incident, clock: Clock, backend: str, verbose: bool = False,
                     context: dict | None = None, states: dict[int, str] | None = None) -> dict:
    """context: what tracer/host/diagnosis.py found out on the host (the process
    holding the lingering socket, the listener's queue, the connecting
    process); None in replays without it."""
    context = context or {}
    penalty = inc.penalty_ns
    rec = {
        "type": "collision",
        "id": inc.id,
        "view": inc.view,
        "time": clock.iso(inc.first_ns),
        "netns": inc.netns,
        "family": "ipv6" if inc.family == AF_INET6 else "ipv4",
        "server": inc.server,
        "client": inc.client,
        "lingering_state": inc.lingering_state,
        "outcome": inc.outcome,
        "outcome_detail": inc.outcome_detail,
        "stuck_reason": inc.stuck_reason,
        "penalty_ms": round(penalty / 1e6, 3) if penalty is not None else None,
        "closewait_age_s": round(inc.closewait["age_s"], 3) if inc.closewait["age_s"] is not None else None,
        "closewait_age_source": inc.closewait["age_source"],
        "closewait_socket": {
            "inode": inc.closewait["inode"],
            "snd_nxt": inc.closewait["snd_nxt"],
            "rcv_nxt": inc.closewait["rcv_nxt"],
            "unread_bytes": inc.closewait.get("unread_bytes"),
            "owners": context.get("owners", []),
            "owners_unknown": context.get("owners_unknown"),
            "ghost": inc.ghost,
        },
        "listener": context.get("listener"),
        "repeat_of": inc.repeat_of,
        "client_netns": inc.client_netns,
        "translation": translation.describe(inc, context),
        "translation_unknown": translation.unknown(inc, context),
        "client_process": context.get("client_process") or inc.client_process,
        "challenge_acks_sent": inc.challenges_sent,
        "challenge_acks_received": inc.challenges_received,
        "challenge_acks_limited": inc.challenges_limited,
        "retransmissions": sum(1 for s in inc.steps if s.name == "retry_syn"),
        "syn_hits": inc.syn_hits,
        "steps": [{"step": s.name, "t_ms": _rel_ms(inc, s.ts_ns), **s.detail} for s in inc.steps],
        "explanation": explain(inc, context),
        "backend": backend,
        "incomplete": inc.incomplete,
        "incomplete_reasons": list(inc.incomplete_reasons),
        "ended_by": inc.ended_by,
    }
    if verbose:
        rec["events"] = [event_record(ev, inc.first_ns, states) for ev in inc.events]
    return rec


def ready_record(backend: str, hooks: list[dict], types_source: str, filters: dict, startup_s: float,
                 stages_s: dict[str, float] | None = None, object_cache: dict | None = None) -> dict:
    return {
        "type": "ready",
        "schema": SCHEMA_VERSION,
        "version": __version__,
        "kernel": os.uname().release,
        "backend": backend,
        "types": types_source,
        "hooks": hooks,
        "filters": filters,
        "startup_s": round(startup_s, 3),
        "stages_s": stages_s or {},
        "object_cache": object_cache,
        "pid": os.getpid(),
    }


def named_processes(context: dict) -> list[dict]:
    """The processes a collision's host context names (each with its
    `workload`): the lingering socket's holders, the listener's, the
    connecting process. A workload selection keeps a collision naming one of
    its own (live: in a namespace it shares with others; in a replay: always)."""
    return (list(context.get("owners") or []) + list((context.get("listener") or {}).get("owners") or [])
            + ([context["client_process"]] if context.get("client_process") else []))


def _who(o: dict) -> str:
    """`comm (pid N)`, and its workload's short name where known."""
    short = short_name(o.get("workload"))
    return f"{o['comm']} (pid {o['pid']})" + (f" in {short}" if short else "")


def _never_accepted(rec: dict) -> bool:
    return rec["lingering_state"] == "CLOSE_WAIT" and rec["closewait_socket"].get("inode") is None


def _culprit_process(rec: dict) -> dict | None:
    """The process to blame (server view): the lingering socket's holder, or,
    for a socket never accept()ed, the listener's (the one not accepting)."""
    if rec.get("view") == "client":
        return None
    held = rec["closewait_socket"].get("owners") or []
    if not held and _never_accepted(rec):
        held = (rec.get("listener") or {}).get("owners") or []
    return held[0] if held else None


def culprit_workload(rec: dict) -> str | None:
    """The culprit's workload in a few words (a metrics label: never a pid),
    None when not known."""
    proc = _culprit_process(rec)
    return short_name(proc.get("workload")) if proc else None


def culprit_of(rec: dict) -> str:
    """Who a collision record blames, in a few words: the process holding the
    lingering socket, or the listener's owner when it never accepted."""
    if rec.get("view") == "client":
        return f"remote server {rec['server']}"
    proc = _culprit_process(rec)
    if _never_accepted(rec):
        return f"{_who(proc)} not accepting on {rec['server']}" if proc else f"not accepted on {rec['server']}"
    if proc:
        return _who(proc)
    return f"{rec['lingering_state']} on {rec['server']}"


@dataclass
class Summary:
    """Running totals for the final `summary` record."""

    started_ns: int = field(default_factory=time.monotonic_ns)
    outcomes: Counter = field(default_factory=Counter)
    culprits: Counter = field(default_factory=Counter)
    worst_penalty_ms: float | None = None
    collisions: int = 0
    server_seen: int = 0  # collisions whose server end was seen (what the kernel's counts count)
    outside_selection: Counter = field(default_factory=Counter)  # not reported: not the --container/--pod/--unit's
    translated: Counter = field(default_factory=Counter)  # collisions through a NAT, by kind
    translation_unknown: Counter = field(default_factory=Counter)  # translation lookups not made, by why

    def add(self, rec: dict) -> None:
        self.collisions += 1
        if rec.get("view", "server") != "client":
            self.server_seen += 1
        self.outcomes[rec["outcome"]] += 1
        self.culprits[culprit_of(rec)] += 1
        if rec.get("translation"):
            self.translated[rec["translation"]["kind"]] += 1
        if rec.get("translation_unknown"):
            self.translation_unknown[rec["translation_unknown"]] += 1
        p = rec["penalty_ms"]
        if p is not None and (self.worst_penalty_ms is None or p > self.worst_penalty_ms):
            self.worst_penalty_ms = p

    def outside(self, reason: str, view: str) -> None:
        """A collision not reported: not the selection's. The kernel counted
        it (its namespace is the selection's), so it is not `unreported`."""
        self.outside_selection[reason] += 1
        if view != "client":
            self.server_seen += 1

    def kernel(self, counts: dict | None) -> dict | None:
        """The kernel's own counts (tracer/kernel/counters.py) beside what was
        reported: `unreported`, the collisions the kernel saw whose server end
        was never reported."""
        if counts is None:
            return None
        rows = counts.get("by_server", [])
        omitted = counts.get("by_server_omitted", 0) + max(0, len(rows) - BY_SERVER_MAX)  # a join's: each one's too
        return {**counts, "by_server": rows[:BY_SERVER_MAX], "by_server_omitted": omitted,
                "reported": self.server_seen, "unreported": max(0, counts["collisions"] - self.server_seen)}

    def record(self, events: int, lost: int, reason: str, undecodable: int = 0, skipped: int | None = None,
               state_hook: dict | None = None, kernel: dict | None = None) -> dict:
        return {
            "type": "summary",
            "collisions": self.collisions,
            "by_outcome": dict(self.outcomes),
            "worst_penalty_ms": self.worst_penalty_ms,
            "top_culprits": [{"culprit": c, "collisions": n} for c, n in self.culprits.most_common(5)],
            "events": events,
            "lost_events": lost,
            "undecodable_events": undecodable,
            "skipped_runs": skipped,
            "state_hook": state_hook,
            "kernel": self.kernel(kernel),
            "outside_selection": dict(self.outside_selection),
            "translated": dict(self.translated),
            "translation_unknown": dict(self.translation_unknown),
            "duration_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 3),
            "stopped_by": reason,
        }
