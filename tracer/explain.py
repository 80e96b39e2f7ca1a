"""Plain words for an incident: what happened, what it cost, what to fix."""

from __future__ import annotations

from tracer.correlator import Incident


def _ms(ns: int) -> str:
    ms = ns / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _age(inc: Incident) -> str:
    age = inc.closewait.get("age_s")
    if age is None:
        return ""
    approx = "" if inc.closewait.get("age_source") == "observed" else "about "
    return f" for {approx}{age:.1f} s"


def explain(inc: Incident) -> str:
    lingering = inc.lingering_state
    parts = [
        f"The client {inc.client} opened a new connection to {inc.server} from a port that an old connection "
        f"still holds on the server side: that socket has been in {lingering}{_age(inc)}."
    ]
    if lingering == "CLOSE_WAIT":
        parts.append(
            "The peer closed the old connection, but the server application never called close() on its socket."
        )
    parts.append(
        "The SYN reached that socket instead of the listener, and the kernel dropped it (RFC 5961 SYN challenge)."
    )
    ack = inc.step("challenge_ack")
    if ack is not None:
        parts.append(
            f"The socket answered with a challenge ACK carrying the old connection's numbers "
            f"(seq {ack.detail['seq']}, ack {ack.detail['ack']})."
        )
    else:
        parts.append("No challenge ACK was let through at that moment (rate limited, or not seen).")
    rst = inc.step("rst")
    if rst is not None and rst.detail.get("seen_at") == "client":
        window = ": exactly the challenge ACK's ack number, so it is in window" if rst.detail.get("in_window") else ""
        parts.append(f"The client, still in SYN-SENT, answered with RST (seq {rst.detail.get('seq')}{window}).")
    elif rst is not None:
        parts.append("The lingering socket then received an RST from the client.")
    if inc.has("closewait_closed"):
        parts.append(f"That RST killed the {lingering} socket.")
    retry = next((s for s in inc.steps if s.name == "retry_syn" and s.detail.get("reached") == "listener"), None)
    if inc.outcome == "recovered":
        via = " The client's retried SYN then reached the listener." if retry or inc.has("retry_syn") else ""
        parts.append(f"{via} The new connection was established {_ms(inc.penalty_ns or 0)} after the first SYN.".lstrip())
        if inc.has("queued") and lingering == "CLOSE_WAIT":
            parts.append(
                "If the old socket was never accept()ed, it is still counted in the listener's accept queue "
                "(Recv-Q) although it is dead."
            )
    elif inc.outcome == "stuck":
        parts.append(
            f"The client's SYN hit the lingering socket {inc.syn_hits} times and the connection is not established: "
            "the challenge ACK is rate limited or dropped on the way, so no RST clears the old socket."
        )
    else:
        parts.append("The connection was not seen established (yet).")
    if inc.incomplete:
        parts.append("Some kernel events were lost while this incident was open: the timeline may miss steps.")
    if lingering == "CLOSE_WAIT":
        parts.append(
            f"Fix: make the server application behind {inc.server} close its sockets when the peer hangs up "
            "(read() returning 0, EPOLLRDHUP) and accept() every connection it queues; until then every client "
            "reusing such a port pays this delay (about 13 ms on Linux >= 5.6 clients, 1 s or more elsewhere)."
        )
    return " ".join(parts)
