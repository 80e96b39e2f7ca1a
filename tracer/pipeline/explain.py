"""Plain words for an incident: what happened, what it cost, what to fix.

The fix is named in the operator's terms: which program at which pid holds
which fd, the listener whose application does not accept(), the client's
port reuse, or a middlebox dropping the challenge ACK.
"""

from __future__ import annotations

from tracer.pipeline import translation
from tracer.pipeline.correlator import Incident

# Why a socket in each lingering state is still there.
WHY_LINGERING = {
    "CLOSE_WAIT": "The peer closed the old connection, but the server application never called close() on its socket.",
    "LAST_ACK": "The server application closed the old connection after the peer did, but its FIN was never "
                "acknowledged (the peer's socket is gone, or the FIN is dropped on the way): the socket waits in "
                "LAST_ACK, retransmitting its FIN.",
    "FIN_WAIT1": "The server closed the old connection first and its FIN has not been acknowledged yet.",
    "FIN_WAIT2": "The server closed the old connection first; the peer acknowledged but never sent its own FIN, "
                 "so the socket waits in FIN_WAIT2 (orphans for net.ipv4.tcp_fin_timeout).",
    "CLOSING": "Both ends closed at once and the server's FIN has not been acknowledged.",
    "TIME_WAIT": "The server closed the old connection first, so its end stays in TIME_WAIT (60 s) remembering "
                 "the old connection's numbers.",
}

FIX_LINGERING = {
    "LAST_ACK": "Fix: this clears itself when the server gives up retransmitting its FIN "
                "(net.ipv4.tcp_orphan_retries); find out why the FIN or its ACK is lost, and do not reuse client "
                "ports that fast.",
    "FIN_WAIT1": "Fix: find out why the server's FIN is not acknowledged; do not reuse client ports that fast.",
    "FIN_WAIT2": "Fix: the peer must close its side; a shorter net.ipv4.tcp_fin_timeout limits how long orphans "
                 "hold the tuple.",
    "CLOSING": "Fix: this clears itself; do not reuse client ports that fast.",
    "TIME_WAIT": "Fix: TIME_WAIT is normal for the end that closes first; the collision needs a client that "
                 "reuses the port within it without TCP timestamps (net.ipv4.tcp_timestamps on the client) and "
                 "with a sequence number below the old connection's: keep timestamps on, or let clients close "
                 "first, or do not reuse client ports that fast.",
}


def short_name(workload: dict | None) -> str | None:
    """A workload (its JSON form) in a few words, of low cardinality (never a
    pid): namespace/pod, else the container's name (or runtime and short id),
    else the systemd unit; None when nothing is known."""
    if not workload:
        return None
    pod, container = workload.get("pod"), workload.get("container")
    if pod:
        return f"{pod['namespace']}/{pod['name']}" if pod.get("name") else f"pod {pod['uid']}"
    if container:
        if container.get("name"):
            return container["name"]
        if container.get("id"):
            return f"{container.get('runtime') or 'container'} {container['id'][:12]}"
    return workload.get("unit")


def _ms(ns: int) -> str:
    ms = ns / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _age(inc: Incident) -> str:
    age = inc.closewait.get("age_s")
    if age is None:
        return ""
    approx = "" if inc.closewait.get("age_source") == "observed" else "about "
    return f" for {approx}{age:.1f} s"


def _owner_text(owner: dict) -> str:
    return f"{owner['comm']} (pid {owner['pid']})"


def _listening(listener: dict | None) -> str:
    """` (the program X (pid N), fd F)`: who holds the listening socket."""
    held = (listener or {}).get("owners") or []
    if not held:
        return ""
    o = held[0]
    more = f" and {len(held) - 1} more" if len(held) > 1 else ""
    return f" (the program {_owner_text(o)}, fd {o['fd']}{more})"


def _culprit(inc: Incident, owners: list[dict], listener: dict | None = None, unknown: str | None = None) -> str:
    unread = inc.closewait.get("unread_bytes")
    unread_text = f", with {unread} unread bytes in it" if unread else ""
    if owners:
        o = owners[0]
        more = f" (and {len(owners) - 1} more processes)" if len(owners) > 1 else ""
        return (f"The program {_owner_text(o)} holds that socket as fd {o['fd']}{more}{unread_text} and never "
                f"closed it after the peer hung up.")
    if inc.closewait.get("inode") is None:
        return (f"That socket was never accept()ed{unread_text}: the application listening on {inc.server}"
                f"{_listening(listener)} does not call accept() for every connection the kernel queues for it.")
    if unknown == "not_readable":
        return (f"The owner of that socket (inode {inc.closewait['inode']}){unread_text} could not be named: no "
                "process this tracer could read held it, and the descriptors of some processes of another user "
                "could not be read (the tracer lacks CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH: see doctor).")
    if unknown == "lookup_deferred":
        return (f"The owner of that socket (inode {inc.closewait['inode']}){unread_text} was not looked up in time: "
                "the scans of /proc are spaced out while collisions come this fast.")
    return (f"No process held that socket (inode {inc.closewait['inode']}) when /proc was scanned after the "
            f"collision{unread_text}: its owner had closed it, or exited.")


def _outcome(inc: Incident) -> list[str]:
    retries = sum(1 for s in inc.steps if s.name == "retry_syn")
    detail = inc.outcome_detail
    if detail == "recovered_unseen":
        est = inc.step("established")
        found = _ms(est.ts_ns - inc.first_ns)
        if est.detail.get("seen_by") == "state_change":
            return [f"The new connection was established: its {est.detail.get('end', 'server')} end left ESTABLISHED "
                    f"{found} after the first SYN, but when it got there, and so the delay the collision cost, was not "
                    "seen."]
        return [f"The new connection was established: the kernel's socket list showed it so {found} after the first "
                "SYN, but when it got there, and so the delay the collision cost, was not seen."]
    if inc.outcome == "recovered":
        retry = any(s.name == "retry_syn" for s in inc.steps)
        via = "The client's retried SYN then reached the listener. " if retry else ""
        text = f"{via}The new connection was established {_ms(inc.penalty_ns or 0)} after the first SYN"
        if detail == "recovered_fast":
            return [text + ": the client retried right after the RST (Linux >= 5.6 clients re-arm their SYN "
                           "timer at once when a challenge ACK answers their SYN)."]
        if inc.challenges_limited:
            return [text + f": {inc.challenges_limited} challenge ACK(s) were first held back by the kernel's rate "
                           "limits (net.ipv4.tcp_challenge_ack_limit, host-wide before Linux 6.0 and per network "
                           "namespace since; net.ipv4.tcp_invalid_ratelimit per socket), so the client heard nothing "
                           "and waited for its SYN's retransmission timeout before colliding again."]
        return [text + ": the retry waited for a full retransmission timeout (clients before Linux 5.6 and "
                       "non-Linux clients wait 1 s or 3 s; so does a SYN that hit the socket twice)."]
    out = []
    if inc.stuck_reason == "stuck_rate_limited":
        out.append(
            f"The client's SYN hit the lingering socket {inc.syn_hits} times; {inc.challenges_limited} challenge "
            "ACK(s) were held back by the kernel's rate limits (net.ipv4.tcp_invalid_ratelimit per socket, "
            "net.ipv4.tcp_challenge_ack_limit host-wide before Linux 6.0, per namespace since), so the client never "
            "learnt the numbers it needs to "
            "reset the old socket.")
    elif inc.stuck_reason == "stuck_challenge_ack_lost":
        out.append(
            f"The client's SYN hit the lingering socket {inc.syn_hits} times ({retries} retransmission(s)); "
            f"{inc.challenges_sent} challenge ACK(s) went out but no RST ever came back: they are lost on the "
            "way to the client (a firewall or NAT dropping them, e.g. conntrack classing them INVALID).")
    elif inc.stuck_reason == "stuck":
        out.append(f"The client's SYN hit the lingering socket {inc.syn_hits} times and the connection is not "
                   "established.")
    if inc.outcome == "gave_up":
        out.append(f"The client closed its connecting socket after {retries} retransmission(s), before the "
                   "connection was established (a connect timeout, or its application gave up).")
    elif inc.outcome == "pending":
        out.append("The connection was not seen established (yet).")
    if inc.has("server_closed"):
        out.append("Meanwhile the server application closed the old socket.")
    return out


INCOMPLETE_TEXT = {
    "events_lost": "Some kernel events were lost while this incident was open (the perf buffer was full): the "
                   "timeline may miss steps.",
    "runs_skipped": "The kernel skipped some of the tracer's BPF runs on this connection (a hook that fires while "
                    "another BPF program runs on that CPU is not run): the timeline may miss steps.",
    "arrival_unseen": "An end of the new connection left ESTABLISHED without its arrival there (nor, often, the "
                      "client's retry) having reached the tracer: the kernel did not run the tracer's programs for "
                      "them (a run skipped while another BPF program ran on that CPU, counted in skipped_runs, or, "
                      "on some virtual machines, not called at all in a softirq on top of certain threads, counted "
                      "nowhere): it was established, when is not known.",
    "tracking_evicted": "More collisions were in progress at once than the kernel-side tracking holds (map "
                        "`tracked`): this one's entry was evicted to make room, so its later events were not "
                        "streamed (the summary's kernel.tracked_evicted counts every eviction).",
    "state_hook_off": "The state hook was attached again only after this collision began, so the connection may "
                      "have been established unseen: it may well have recovered.",
    "recording_cut": "The recording ends while this collision was in progress (it was cut short): what came "
                     "after is not in it.",
    "event_missed": "The hook on tcp_send_challenge_ack() did not report a challenge ACK that the SYN's hook said "
                    "it would (the kernel did not run its program, which kernels before 5.12 do not count): the "
                    "challenge ACKs counted as sent are the ones the client's end received.",
    "established_unseen": "The state hook was attached again only after this collision began and did not see the "
                          "connection established; the kernel's socket list showed it established afterwards.",
}


def _incomplete(inc: Incident) -> list[str]:
    return [INCOMPLETE_TEXT[r] for r in inc.incomplete_reasons]


def _listener(inc: Incident, listener: dict | None, ghost: bool) -> list[str]:
    out = []
    if ghost:
        out.append("The old socket was never accept()ed, so it died inside the listener's accept queue and is "
                   "still counted there (a ghost) until the application accepts it.")
    if listener:
        out.append(
            f"The listener {listener['listener']} now has {listener['recv_q']} connection(s) queued (Recv-Q) "
            f"of {listener['limit']}: {listener['alive']} alive, {listener['ghosts']} dead.")
        if listener.get("full"):
            out.append("Its queue is full: the kernel now drops new connections to it until its application "
                       "accepts (ghosts included).")
    elif inc.has("queued") and inc.lingering_state == "CLOSE_WAIT" and inc.outcome == "recovered" and not ghost:
        out.append("If the old socket was never accept()ed, it is still counted in the listener's accept queue "
                   "(Recv-Q) although it is dead.")
    return out


def _fix(inc: Incident, owners: list[dict], listener: dict | None = None) -> str:
    lingering = inc.lingering_state
    if inc.stuck_reason == "stuck_challenge_ack_lost":
        path = ("Fix now: let the challenge ACK (a bare ACK from the server port) through the firewall or NAT "
                "on the client's path. ")
    elif inc.stuck_reason == "stuck_rate_limited":
        path = "Fix now: the rate limits hold the challenge ACKs back; they cannot be tuned per socket. "
    else:
        path = ""
    if lingering != "CLOSE_WAIT":
        return path + FIX_LINGERING.get(lingering, "")
    if owners:
        o = owners[0]
        who = f"the program {_owner_text(o)} never closes fd {o['fd']} after the peer hangs up"
        what = f"make {o['comm']} close its sockets when read() returns 0 (or on EPOLLRDHUP)"
    elif inc.closewait.get("inode") is None:
        who = f"the application listening on {inc.server}{_listening(listener)} leaves connections in its accept queue"
        what = "make it accept() every connection it queues (and close them when the peer hangs up)"
    else:
        who = f"an application behind {inc.server} never closes its socket after the peer hangs up"
        what = "make it close its sockets when the peer hangs up (read() returning 0, EPOLLRDHUP)"
    return (f"{path}Fix: {who}; {what}. Until then every client reusing such a port pays this delay (about "
            "13 ms on Linux >= 5.6 clients, 1 s or more elsewhere); clients can avoid it by not reusing "
            "source ports quickly (a wider net.ipv4.ip_local_port_range, no fixed bind() ports).")


def _process(proc: dict | None) -> str:
    if not proc:
        return ""
    where = short_name(proc.get("workload"))
    return f" ({proc['comm']}, pid {proc['pid']}" + (f", in {where})" if where else ")")


def _explain_client(inc: Incident, proc: dict | None, context: dict) -> str:
    """Only the client's end was traced: the culprit is on the remote server."""
    ack = inc.step("challenge_ack")
    numbers = f" (seq {ack.detail['seq']}, ack {ack.detail['ack']})" if ack is not None else ""
    parts = [
        f"The client {inc.client}{_process(proc)} connected to {inc.server} from a port that the server still "
        f"ties to an old connection: its SYN was answered not with a SYN-ACK but with a bare ACK carrying the old "
        f"connection's numbers{numbers}, an RFC 5961 challenge ACK.",
        f"The server at {inc.server} still holds an old connection from this port in CLOSE_WAIT: its application "
        "is not closing sockets. (From the client alone this cannot be told apart from an old socket in LAST_ACK, "
        "FIN_WAIT2 or TIME_WAIT; run tcpcollide-trace on the server's host to name the process holding it.)",
    ]
    rst = inc.step("rst")
    if rst is not None:
        parts.append(f"The client's kernel, still in SYN-SENT, answered with RST (seq {rst.detail.get('seq')}), "
                     "which kills the old connection on the server when it gets there.")
    if inc.repeat_of:
        parts.append(f"This client port collided with that server before: incident #{inc.repeat_of['id']}.")
    parts += _outcome(inc)
    if inc.outcome in ("stuck", "gave_up") and inc.challenges_received > 1:
        parts.append(f"The client answered {inc.challenges_received} challenge ACKs with RST, yet the server kept "
                     "answering its SYNs with the old numbers: the RSTs do not reach the server or do not kill the "
                     "old socket there (a firewall or NAT on the path dropping them?).")
    parts += _incomplete(inc)
    nat = translation.describe(inc, context)
    if nat is not None:
        parts.insert(1, translation.sentence(nat, _process(proc), "for an old connection"))
    parts.append(
        f"Fix: on the server {inc.server}, make its application close its sockets when the peer hangs up "
        "(read() returning 0, EPOLLRDHUP). Until then every client reusing such a port pays this delay (about "
        "13 ms on Linux >= 5.6 clients, 1 s or more elsewhere); this client can avoid it by not reusing source "
        "ports quickly (a wider net.ipv4.ip_local_port_range, no fixed bind() ports).")
    if nat is not None:
        parts.append(translation.fix(nat, None))
    return " ".join(parts)


def explain(inc: Incident, context: dict | None = None) -> str:
    context = context or {}
    proc = inc.client_process or context.get("client_process")
    if inc.view == "client":
        return _explain_client(inc, proc, context)
    owners = context.get("owners", [])
    lingering = inc.lingering_state
    parts = [
        f"The client {inc.client}{_process(proc)} opened a new connection to {inc.server} from a port that an old "
        f"connection still holds on the server side: that socket has been in {lingering}{_age(inc)}."
    ]
    nat = translation.describe(inc, context)
    if nat is not None:
        parts.append(translation.sentence(nat, _process(proc), f"in {lingering}"))
    if lingering in WHY_LINGERING:
        parts.append(WHY_LINGERING[lingering])
    if lingering == "CLOSE_WAIT":
        parts.append(_culprit(inc, owners, context.get("listener"), context.get("owners_unknown")))
    if inc.repeat_of:
        same = "the same socket" if inc.repeat_of["same"] == "socket" else "the same port pair (a new lingering socket)"
        parts.append(f"It happened before on {same}: incident #{inc.repeat_of['id']}.")
    if lingering == "TIME_WAIT":
        parts.append(
            "The SYN reached that socket instead of the listener; a TIME_WAIT socket lets a new SYN through only "
            "when its sequence number is above the old connection's or its timestamp is newer, so the kernel "
            "dropped it.")
    else:
        parts.append(
            "The SYN reached that socket instead of the listener, and the kernel dropped it (RFC 5961 SYN challenge)."
        )
    ack = inc.step("challenge_ack")
    if ack is not None:
        parts.append(
            f"The socket answered with a challenge ACK carrying the old connection's numbers "
            f"(seq {ack.detail['seq']}, ack {ack.detail['ack']})."
        )
        if ack.detail.get("matches_server") is False:
            parts.append(f"The client received it as seq {ack.detail['received_seq']}, ack "
                         f"{ack.detail['received_ack']}: something on the path rewrites sequence numbers.")
    else:
        parts.append("No challenge ACK was let through at that moment (rate limited, or not seen).")
    rst = inc.step("rst")
    if rst is not None and rst.detail.get("seen_at") == "client":
        window = ": exactly the challenge ACK's ack number, so it is in window" if rst.detail.get("in_window") else ""
        parts.append(f"The client, still in SYN-SENT, answered with RST (seq {rst.detail.get('seq')}{window}).")
    elif rst is not None and nat is not None:
        parts.append("The lingering socket then received an RST: from the client, or from the NAT itself (a "
                     "translator that cannot map the challenge ACK back answers it with its own RST); the client's "
                     "end is not traced on this host to tell.")
    elif rst is not None:
        parts.append("The lingering socket then received an RST from the client.")
    if inc.has("closewait_closed"):
        parts.append(f"That RST killed the {lingering} socket.")
    elif lingering == "TIME_WAIT" and rst is not None:
        parts.append("That RST kills a TIME_WAIT socket (with net.ipv4.tcp_rfc1337 = 0, the default).")
    parts += _outcome(inc)
    parts += _listener(inc, context.get("listener"), inc.ghost)
    parts += _incomplete(inc)
    fix = _fix(inc, owners, context.get("listener"))
    if fix:
        parts.append(fix)
    if nat is not None:
        parts.append(translation.fix(nat, inc.closewait.get("age_s")))
    return " ".join(parts)
