"""Output: JSON lines, or readable reports drawn with rich.

Both draw from the records of tracer/pipeline/records.py. Text that comes from the
kernel (addresses are formatted by us, but process names, for one, are not)
is untrusted: it is made inert (control characters escaped, never parsed as
rich markup) before it reaches a terminal.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TextIO

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.pipeline.records import short_name

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

STEP_LABELS = {
    "syn": "SYN from the reused port hits the lingering socket",
    "syn_sent": "client sends its SYN from the reused port",
    "client_closed": "client closes its connecting socket",
    "server_closed": "server application closes the lingering socket",
    "challenge_ack": "challenge ACK with the old connection's numbers",
    "rst": "client answers with RST",
    "closewait_closed": "the RST kills the lingering socket",
    "retry_syn": "client retries its SYN",
    "established": "new connection established",
    "queued": "new connection queued on the listener",
}

# why a socket's owners are not named (`owners_unknown`, docs/json-schema.md)
OWNER_UNKNOWN = {
    "not_held": "no process held it when /proc was scanned: closed, or its process exited",
    "lookup_deferred": "not looked up in time: /proc scans are spaced out in a storm",
    "not_readable": "not found, and some processes' descriptors could not be read (another user's: the tracer "
                    "lacks CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH)",
}


def inert(s: object) -> str:
    """Escape control characters (terminal escape sequences included)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(s))


def translation_line(t: dict) -> str:
    """The NAT between the ends: `snat: 10.0.1.7:43210 -> 192.0.2.10:43210 (conntrack, netns N)`."""
    b, a = t["before"], t["after"]
    moved = [f"{b['client']} -> {a['client']}"] if b["client"] != a["client"] else []
    if b["server"] != a["server"]:
        moved.append(f"{b['server']} -> {a['server']}")
    ct = t.get("conntrack")
    where = (f"conntrack in netns {ct['netns']}: {ct['tcp_state']}" if ct else
             f"conntrack: {t.get('conntrack_unknown')}")
    return f"NAT ({t['kind']}): {', '.join(moved)}  [{where}]"


class JsonWriter:
    """JSON lines. flush_each: flush after every record; otherwise the
    caller flushes (a live session does after each batch of events: one
    write for a storm's hundreds of records, not one each)."""

    def __init__(self, out: TextIO = sys.stdout, flush_each: bool = True):
        self.out = out
        self.flush_each = flush_each

    def write(self, rec: dict) -> None:
        # json.dumps escapes every control character: the line is inert
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        if self.flush_each:
            self.out.flush()

    def flush(self) -> None:
        self.out.flush()


LOSS_WORDS = {
    "events_lost": "kernel events lost (perf buffer full)",
    "events_not_submitted": "events the perf buffer refused",
    "runs_skipped": "BPF runs the kernel skipped",
    "events_undecodable": "undecodable events",
    "untracked": "collisions the kernel could not track",
    "uncounted": "collisions the kernel's per-port counts had no room for",
    "tracked_evicted": "collisions in progress whose kernel-side tracking was evicted (map full)",
}


def _in(proc: dict) -> str:
    """`  [workload]` after a process, where its unit, container or pod is known."""
    short = short_name(proc.get("workload"))
    return f"  [{short}]" if short else ""


_OBJECT_CACHE = {
    "hit": "program loaded from the compiled-object cache (no compile)",
    "stored": "program compiled, and kept for the next start",
    "miss": "program compiled",
    "off": "program compiled (the compiled-object cache is off)",
    "unsupported": "program compiled (programs of this kind are compiled at every start)",
    "corrupt": "program compiled: the cached object was corrupt",
    "failed": "program compiled: the compiled-object cache failed",
    "refused": "program compiled: the cached object was not read",
}


def object_cache_line(cache: dict) -> tuple[str, bool]:
    """ready.object_cache in words, and whether it is worth a warning."""
    state = cache.get("state")
    said = _OBJECT_CACHE.get(state, f"compiled-object cache: {state}")
    if cache.get("why"):
        said += f" ({cache['why']})"
    return inert(said), state in ("corrupt", "failed", "refused")


def storm_line(rec: dict) -> str:
    """A `storm` record as one sentence."""
    lost = ", ".join(f"{n} {LOSS_WORDS.get(k, k)}" for k, n in rec["lost"].items())
    k = rec["kernel"]
    return (f"storm: in the last {rec['seconds']:.1f} s, {lost}; so far the kernel counted {k['collisions']} "
            f"collision(s) ({k['syn_hits']} challenged SYNs) and {k['reported']} were reported")


def kernel_line(kernel: dict) -> str:
    """The summary's `kernel` part as one sentence."""
    text = (f"the kernel counted {kernel['collisions']} collision(s) ({kernel['syn_hits']} challenged SYNs); "
            f"{kernel['reported']} reported")
    if kernel["unreported"]:
        text += f", {kernel['unreported']} never reported (their events were lost or not followed)"
    return text


def _shift(basis: str, shift_ms: float, uncertainty_ms: float | None) -> str:
    if basis == "reference":
        return "its clock is the reference"
    if basis == "same_clock":
        return "the same boot of the same kernel: one clock, not shifted"
    within = "within an unknown error" if uncertainty_ms is None else f"+-{uncertainty_ms:.3f} ms"
    how = "by the collisions seen at both ends" if basis == "matched" else "by the hosts' wall clocks"
    return f"clock shifted {shift_ms:+.3f} ms {within} ({how})"


def joined_line(joined: dict) -> str:
    """A joined collision's recordings and the clock shift its times got."""
    return (f"joined from {' + '.join(joined['recordings']) or 'no recording'}: "
            + _shift(joined["clock_basis"], joined["clock_shift_ms"], joined["clock_uncertainty_ms"]))


def joined_recording_line(j: dict) -> str:
    """One recording of a join, in the summary."""
    clock = j["clock"]
    return (f"  recording {j['path']} (host {j.get('host') or '?'}, {j['collisions_alone']} collision(s) alone, "
            f"{clock['matched']} seen at both ends): "
            + _shift(clock["basis"], clock["shift_ms"], clock["uncertainty_ms"]))


def event_line(rec: dict) -> str:
    """One kernel event (an `event` record, --all-events) on one line."""
    states = rec.get("oldstate_name", rec["oldstate"])
    if rec["newstate"] != rec["oldstate"]:
        states = f"{states}->{rec.get('newstate_name', rec['newstate'])}"
    return (f"event {rec['ts_ns']} cpu{rec['cpu']} {rec['backend']}:{rec['hook']} {rec['event']} netns {rec['netns']} "
            f"{rec['local']} -> {rec['remote']} sk {rec['skaddr']} {states} seq {rec['seq']} ack {rec['ack']}"
            + (f" flags {','.join(rec['flag_names'])}" if rec.get("flag_names") else ""))


def _value(v: object) -> str:
    """A step's detail value for a person: yes/no, not Python's True/False;
    "unknown" where the record says None (in_window without the server's end)."""
    if v is True:
        return "yes"
    if v is False:
        return "no"
    if v is None:
        return "unknown"
    return str(v)


def _step_detail(step: dict) -> str:
    skip = {"step", "t_ms"}
    return ", ".join(f"{k}={_value(v)}" for k, v in step.items() if k not in skip)


class TextWriter:
    """Human-readable reports (rich)."""

    def __init__(self, out: TextIO = sys.stdout, color: bool | None = None, width: int | None = None):
        self.console = Console(
            file=out, highlight=False, markup=False, emoji=False,
            no_color=(color is False), force_terminal=color, width=width,
        )

    def flush(self) -> None:
        self.console.file.flush()

    def write(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "collision":
            self._collision(rec)
        elif kind == "ready":
            self._ready(rec)
        elif kind == "summary":
            self._summary(rec)
        elif kind == "doctor":
            self._doctor(rec)
        elif kind == "inventory":
            self._inventory(rec)
        elif kind == "queue":
            style = "red bold" if rec["event"] == "overflow" else "yellow"
            self.console.print(Text(inert(f"queue {rec['event']} (netns {rec['netns']}): {rec['explanation']}"),
                                    style=style))
        elif kind == "event":
            self.console.print(Text(inert(event_line(rec)), style="dim"))
        elif kind == "storm":
            self.console.print(Text(storm_line(rec), style="red bold"))

    def _ready(self, rec: dict) -> None:
        hooks = ", ".join(f"{h['logical']}={h['target']}" + (" (during collisions)" if h.get("lazy") else "")
                          for h in rec["hooks"] if h["available"])
        missing = [h for h in rec["hooks"] if not h["available"]]
        self.console.print(Text(
            f"tcpcollide-trace {rec['version']} ready in {rec['startup_s']:.2f} s on {inert(rec['kernel'])}: "
            f"backend {rec['backend']}, types from {inert(rec['types'])}", style="bold"))
        self.console.print(Text(f"  hooks: {hooks}", style="dim"))
        if rec.get("object_cache"):
            said, warn = object_cache_line(rec["object_cache"])
            self.console.print(Text(f"  {said}", style="yellow" if warn else "dim"))
        for h in missing:
            self.console.print(Text(f"  cannot see {h['logical']}: {inert(h['note'])}", style="yellow"))
        self.console.print(Text("Tracing TCP port collisions with lingering sockets... Ctrl-C to stop.", style="dim"))

    def _collision(self, rec: dict) -> None:
        style = {"recovered": "yellow", "stuck": "red", "pending": "magenta"}.get(rec["outcome"], "white")
        view = rec.get("view", "server")
        head = Text(inert(f"collision #{rec['id']}: {rec['client']} -> {rec['server']}  ({view} view)"), style="bold")
        netns = [f"server netns {rec['netns']}"] if rec["netns"] is not None else []
        if rec.get("client_netns") is not None:
            netns.append(f"client netns {rec['client_netns']}")
        where = Text(inert(f"{rec['time']}  {rec['family']}  {', '.join(netns)}"), style="dim")
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("t (ms)", justify="right")
        table.add_column("step")
        table.add_column("detail", overflow="fold")
        for s in rec["steps"]:
            label = "syn_sent" if s["step"] == "syn" and s.get("sent") else s["step"]
            table.add_row(f"{s['t_ms']:.3f}", inert(STEP_LABELS.get(label, label)), inert(_step_detail(s)))
        age = rec["closewait_age_s"]
        age_text = "unknown" if age is None else (
            f"{age:.3f} s" + ("" if rec["closewait_age_source"] == "observed" else " (estimated)"))
        penalty = rec["penalty_ms"]
        facts = Text()
        detail = rec.get("outcome_detail")
        facts.append(f"outcome: {rec['outcome']}" + (f" ({detail})" if detail and detail != rec["outcome"] else ""),
                     style=style + " bold")
        facts.append(f"   penalty: {'-' if penalty is None else f'{penalty:.1f} ms'}")
        if rec["lingering_state"] is not None:
            facts.append(inert(f"   {rec['lingering_state']} socket age: {age_text}"))
        else:
            facts.append(inert(f"   old connection held by the remote server {rec['server']}"))
        proc = rec.get("client_process")
        if proc:
            facts.append("\n")
            facts.append(inert(f"connecting process: {proc['comm']} (pid {proc['pid']})" + _in(proc)))
        sock = rec["closewait_socket"]
        if sock["inode"]:
            facts.append(f"   socket inode: {sock['inode']}")
        for o in sock.get("owners", []):
            facts.append("\n")
            facts.append(inert(f"held by: {o['comm']} (pid {o['pid']}) fd {o['fd']}" + _in(o)), style="bold")
        if sock["inode"] and not sock.get("owners") and sock.get("owners_unknown") in OWNER_UNKNOWN:
            facts.append("\n")
            facts.append(f"held by: unknown ({OWNER_UNKNOWN[sock['owners_unknown']]})", style="yellow")
        if sock.get("unread_bytes"):
            facts.append(f"   unread: {sock['unread_bytes']} B")
        if sock.get("ghost"):
            facts.append("\nnever accepted: now a ghost in the listener's accept queue", style="red")
        q = rec.get("listener")
        if q:
            facts.append("\n")
            facts.append(inert(f"listener {q['listener']}: Recv-Q {q['recv_q']} of {q['limit']}, "
                               f"{q['alive']} alive, {q['ghosts']} dead" + (" (FULL)" if q["full"] else "")))
            for o in q.get("owners", []):
                facts.append("\n")
                facts.append(inert(f"listener held by: {o['comm']} (pid {o['pid']}) fd {o['fd']}" + _in(o)),
                             style="bold" if sock.get("inode") is None else None)
            if not q.get("owners") and q.get("owners_unknown") in OWNER_UNKNOWN:
                facts.append("\n")
                facts.append(f"listener held by: unknown ({OWNER_UNKNOWN[q['owners_unknown']]})", style="yellow")
        nat = rec.get("translation")
        if nat:
            facts.append("\n")
            facts.append(inert(translation_line(nat)), style="bold")
        elif rec.get("translation_unknown"):
            facts.append("\n")
            facts.append(f"translation: not looked for ({rec['translation_unknown']})", style="yellow")
        if rec.get("repeat_of"):
            facts.append(f"\nrepeat of collision #{rec['repeat_of']['id']} (same {rec['repeat_of']['same']})")
        if rec.get("joined"):
            facts.append("\n")
            facts.append(inert(joined_line(rec["joined"])), style="dim")
        if rec["incomplete"]:
            facts.append(inert(f"   (incomplete: {', '.join(rec.get('incomplete_reasons') or ['events lost'])})"),
                         style="red")
        body = Table.grid()
        body.add_row(where)
        body.add_row(table)
        body.add_row(facts)
        body.add_row(Text(inert(rec["explanation"]), style="italic"))
        if rec.get("events"):
            for ev in rec["events"]:
                body.add_row(Text(inert(json.dumps(ev)), style="dim"))
        self.console.print(Panel(body, title=head, title_align="left", border_style=style))

    def _doctor(self, rec: dict) -> None:
        def line(label: str, value, style: str = "") -> None:
            self.console.print(Text(inert(f"{label:<12} {value}"), style=style))

        line("kernel", rec["kernel"])
        line("root", "yes" if rec["root"] else "no")
        line("bcc", rec["bcc"] or "missing")
        line("tracefs", rec["tracefs"] or "not mounted")
        line("BTF", rec["btf"] or "none")
        line("headers", rec["headers"] or "none")
        line("types from", rec["types"] or "nowhere")
        line("lockdown", rec["lockdown"])
        line("kprobes", "yes" if rec["kprobes"] else "no")
        fentry = {True: "yes", False: "no", None: "unknown"}[rec["fentry"]]
        line("fentry", fentry + (f" ({rec['fentry_note']})" if rec["fentry_note"] else ""))
        line("backend", rec["backend"] or "none")
        if rec.get("conntrack"):
            ct = rec["conntrack"]
            line("conntrack", "visible: translations are named from their entries (ctnetlink)" if ct["visible"]
                 else f"not visible ({ct['problem']}): translations are named only where both ends are traced",
                 "" if ct["visible"] else "yellow")
        if rec.get("stages_s"):
            line("took", ", ".join(f"{k} {v:.3f} s" for k, v in rec["stages_s"].items()))
        if rec.get("object_cache"):
            said, warn = object_cache_line(rec["object_cache"])
            line("object", said, "yellow" if warn else "")
        if rec.get("capabilities"):
            line("capabilities", ", ".join(rec["capabilities"]["effective"]) or "none of those it uses")
            for m in rec["capabilities"]["missing"]:
                if not m["fatal"]:
                    line("degraded", f"without {m['capability']}: {m['cost']}", "yellow")
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("hook", "backend", "target", "fires", "note"):
            table.add_column(col, overflow="fold")
        for h in rec["hooks"]:
            fires = {True: "yes", False: "NO", None: "-"}[h["verified"]]
            table.add_row(inert(h["logical"]), inert(h["backend"] or "-"), inert(h["target"] or "-"), fires,
                          inert(h["note"]))
        self.console.print(table)
        for p in rec["problems"]:
            self.console.print(Text(inert(f"problem: {p}"), style="red"))
        self.console.print(Text("the tracer can work here" if rec["ok"] else "the tracer cannot work here",
                                style="bold green" if rec["ok"] else "bold red"))

    def _inventory(self, rec: dict) -> None:
        def age(v) -> str:
            return "-" if v is None else f"{v:.1f} s"

        self.console.print(Text(
            f"{rec['closewait_total']} CLOSE_WAIT socket(s) in {rec['namespaces']} network namespace(s); "
            f"{len(rec['listeners'])} of {rec['listeners_total']} listener(s) with ghosts or a full queue",
            style="bold"))
        if rec["closewait"]:
            table = Table(box=None, header_style="bold", pad_edge=False, title="CLOSE_WAIT sockets by process",
                          title_justify="left")
            # 80 columns: the workload under its command, numbers whole, the rest folds
            for col, just, whole in (("pid", "right", True), ("command [workload]", "left", False),
                                     ("netns", "right", True), ("local", "left", False), ("sockets", "right", True),
                                     ("oldest", "right", True), ("newest", "right", True), ("unread", "right", True),
                                     ("fds", "left", False)):
                table.add_column(col, justify=just, overflow="fold", no_wrap=whole)
            for g in rec["closewait"]:
                fds = ",".join(str(s["fd"]) for s in g["sockets"] if s["fd"] is not None)
                short = short_name(g.get("workload"))
                table.add_row("-" if g["pid"] is None else str(g["pid"]),
                              inert(g["comm"]) + (f"\n[{inert(short)}]" if short else ""), str(g["netns"]),
                              inert(g["local"]), str(g["count"]), age(g["oldest_age_s"]), age(g["newest_age_s"]),
                              f"{g['unread_bytes']} B", inert(fds[:60] + ("..." if len(fds) > 60 else "")))
            self.console.print(table)
        if rec["listeners"]:
            table = Table(box=None, header_style="bold", pad_edge=False, title="listeners with ghosts",
                          title_justify="left")
            for col, just in (("netns", "right"), ("listener", "left"), ("Recv-Q", "right"), ("limit", "right"),
                              ("alive", "right"), ("ghosts", "right"), ("", "left")):
                table.add_column(col, justify=just)
            for q in rec["listeners"]:
                table.add_row(str(q["netns"]), inert(q["listener"]), str(q["recv_q"]), str(q["limit"]),
                              str(q["alive"]), str(q["ghosts"]), "FULL: new connections refused" if q["full"] else "")
            self.console.print(table)
        self.console.print(Text(f"ages: {rec['age_source']}", style="dim"))

    def _summary(self, rec: dict) -> None:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(rec["by_outcome"].items())) or "none"
        worst = rec["worst_penalty_ms"]
        self.console.print(Text(
            f"{rec['collisions']} collision(s) ({outcomes}); worst penalty "
            f"{'-' if worst is None else f'{worst:.1f} ms'}; {rec['events']} kernel events, "
            f"{rec['lost_events']} lost; {rec['duration_s']:.1f} s", style="bold"))
        for c in rec.get("top_culprits", []):
            self.console.print(Text(inert(f"  {c['collisions']:>5}  {c['culprit']}")))
        kernel = rec.get("kernel")
        if kernel is not None:
            self.console.print(Text(kernel_line(kernel), style="red" if kernel["unreported"] else ""))
            for what in ("events_not_submitted", "untracked", "uncounted"):
                if kernel.get(what):
                    self.console.print(Text(f"warning: {kernel[what]} {LOSS_WORDS[what]}", style="red"))
        for j in rec.get("joined") or ():
            self.console.print(Text(inert(joined_recording_line(j)), style="dim"))
        rec_state = rec.get("recording") or {}
        if rec_state.get("stopped"):
            at = rec_state.get("stopped_at_bytes")
            self.console.print(Text(inert(
                f"warning: the recording {rec_state.get('path')} stopped{f' at {at} bytes' if at is not None else ''}: "
                f"{rec_state['stopped']} (it replays up to there)"), style="red"))
        dropped = rec.get("output_dropped")
        if dropped:
            self.console.print(Text(
                f"warning: {dropped['records']} record(s) ({dropped['bytes']} bytes) were dropped while standard "
                "output was not read", style="red"))
        if rec.get("translated"):
            self.console.print(Text(inert("through a NAT: " + ", ".join(
                f"{kind} {n}" for kind, n in sorted(rec["translated"].items())))))
        if rec.get("translation_unknown"):
            self.console.print(Text(
                f"warning: the translation of {sum(rec['translation_unknown'].values())} collision(s) was not looked "
                f"for in conntrack ({', '.join(sorted(rec['translation_unknown']))})", style="yellow"))
        outside = rec.get("outside_selection") or {}
        if outside:
            self.console.print(Text(
                f"not shown: {sum(outside.values())} collision(s) in a network namespace the selected workloads "
                f"share with others, not theirs ({outside.get('not_selected', 0)} named other processes, "
                f"{outside.get('unattributed', 0)} named none)", style="dim"))
        if rec["lost_events"]:
            self.console.print(Text(f"warning: {rec['lost_events']} kernel events were lost", style="red"))
        if rec.get("skipped_runs"):
            self.console.print(Text(
                f"warning: the kernel skipped {rec['skipped_runs']} run(s) of the tracer's BPF programs (a hook "
                "fired while another BPF program ran on that CPU); any of them may have been an event", style="red"))
