"""The address translation between a collision's two ends, as its report
names it (`translation`), and in the operator's words.

Two sources, each enough alone:
- the two ends' own tuples, when both ends were traced: the client's
  (`before` the translation) and the server's (`after` it) differ, and the
  correlator joined them on the challenge ACK's numbers (a NAT rewrites
  addresses and ports, not sequence numbers);
- the translator's conntrack entry, when a namespace of this host
  translates the connection (tracer/host/conntrack.py): found from either
  end alone (a published port in front of a server here, a pod's SNAT onto
  the node's address towards a server elsewhere).

Pure: an incident and the host's context in, a dict out.
"""

from __future__ import annotations

from tracer.pipeline.correlator import Incident, endpoint, translation_kind

KIND_WORDS = {"snat": "source NAT (masquerade or snat)", "dnat": "destination NAT (a published port, a service)",
              "snat+dnat": "source and destination NAT"}


def _kind_of(entry: dict) -> str | None:
    src, dst = "src_nat" in entry["status"], "dst_nat" in entry["status"]
    return "snat+dnat" if src and dst else "snat" if src else "dnat" if dst else None


def describe(inc: Incident, context: dict | None) -> dict | None:
    """The `translation` of a collision record, None when none is known."""
    found = (context or {}).get("conntrack") or {}
    entry = found.get("entry")
    if inc.translated is not None:
        before, after = inc.translated["before"], inc.translated["after"]
        out = {"kind": translation_kind(before, after),
               "before": {"client": endpoint(before, False), "server": endpoint(before, True)},
               "after": {"client": endpoint(after, False), "server": endpoint(after, True)},
               "seen_by": "both_ends"}
    elif entry is not None:
        orig, reply = entry["original"], entry["reply"]
        out = {"kind": _kind_of(entry),
               "before": {"client": orig["src"], "server": orig["dst"]},
               "after": {"client": reply["dst"], "server": reply["src"]},
               "seen_by": "conntrack"}
    else:
        return None
    out["conntrack"] = ({**entry, "netns": found.get("netns"), "timeouts_s": found.get("timeouts")}
                        if entry is not None else None)
    out["conntrack_unknown"] = None if entry is not None else found.get("unknown", "not_asked")
    out["challenge_ack_reached_client"] = (inc.challenges_received > 0) if inc.seen_client else None
    rst = inc.step("rst")
    out["rst_from"] = ("client" if rst is not None and rst.detail.get("seen_at") == "client"
                       else None)
    return out


def unknown(inc: Incident, context: dict | None) -> str | None:
    """Why a collision with no translation named may still have one that
    was not looked for (`translation_unknown`): "budget" (the lookups' budget
    was spent in a storm), "unavailable" (ctnetlink could not be asked)."""
    if inc.translated is not None:
        return None
    why = ((context or {}).get("conntrack") or {}).get("unknown")
    return why if why in ("budget", "unavailable") else None


def sentence(t: dict, client_process: str = "", held: str = "in CLOSE_WAIT") -> str:
    """What the translation did, in the operator's words."""
    ct = t.get("conntrack")
    where = "A NAT on this host" if ct is not None else "A NAT between the two ends"
    if ct is not None and ct.get("netns"):
        where += f" (network namespace {ct['netns']})"
    b, a = t["before"], t["after"]
    if t["kind"] == "dnat":
        mapped = (f"{where} forwarded the connection {b['client']} -> {b['server']} to {a['server']}, where an old "
                  f"connection from {a['client']} still holds the tuple {held}")
    else:
        mapped = (f"{where} mapped the client {b['client']}{client_process} onto {a['client']}, a port the server "
                  f"{a['server']} still holds {held}")
        if t["kind"] == "snat+dnat":
            mapped += f" (and its destination {b['server']} onto {a['server']})"
    return mapped + f": {KIND_WORDS.get(t['kind'], 'NAT')}."


def fix(t: dict, age_s: float | None) -> str:
    """The NAT's part of the fix: its conntrack timeouts, or the port range."""
    ct = t.get("conntrack") or {}
    tos = ct.get("timeouts_s") or {}
    remembered = ""
    if tos:
        remembered = (f" (this one forgets a closing connection after {tos.get('close_wait')} s in CLOSE_WAIT, "
                      f"{tos.get('fin_wait')} s in FIN_WAIT, {tos.get('time_wait')} s in TIME_WAIT: "
                      "net.netfilter.nf_conntrack_tcp_timeout_*)")
    held = f", which held it for {age_s:.1f} s" if age_s is not None else ""
    if t["kind"] == "dnat":
        return ("In the NAT: it forwarded a new connection onto a tuple the server still held" + held
                + "; the server's fix is the real one.")
    return ("In the NAT: it reused an outside port the server still held" + held
            + "; keep its conntrack timeouts longer than the server's sockets linger" + remembered
            + ", or give it a port range the server has not seen (more addresses or ports to SNAT onto, "
              "`random-fully`).")
