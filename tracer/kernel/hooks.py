"""Hook selection: which kernel hook serves each logical hook on this kernel.

A logical hook is something the collision logic needs to see. Each has
candidates in order of preference, in up to three backends (fentry, kprobe,
tracepoint). Selection takes the first candidate the running kernel really
offers (tracefs formats, kallsyms, BTF, and whether fentry programs load at
all), and says plainly what it could not find. `--backend X` forces X for
every hook that has an X candidate; a forced backend that cannot serve a
required hook is an error, never a silent fallback.

Selection only plans. That a planned hook really fires is proven afterwards
by the self-test (tracer/selftest.py), which can exclude a candidate that
attached but never fired (an inlined function) and plan again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.kernel import capabilities

BACKENDS = ("fentry", "kprobe", "tracepoint")

# logical hook -> what it is for (the words the operator reads)
LOGICAL_HOOKS = {
    "set_state": "TCP state changes (CLOSE_WAIT sockets, the RST's victim, the new connection)",
    "syn_challenged": "a SYN challenged by a socket in a lingering state (the collision itself)",
    "challenge_ack": "the challenge ACK itself (tcp_send_challenge_ack)",
    "connect": "the process that connects the client socket",
    "queued": "the new connection joining the listener's accept queue",
    "send_reset": "the client's RST answering the challenge ACK",
    "receive_reset": "the lingering socket receiving that RST",
    "retransmit": "the client's retried SYN",
    "timewait_syn": "a SYN answered by a TIME_WAIT socket with the old connection's numbers",
}
REQUIRED = ("set_state", "syn_challenged")

# What a logical hook becomes when no backend serves it, where that is still useful.
WITHOUT = {
    "challenge_ack": "reported from the socket's challenge-ACK rate limiter stamp instead (blind to "
                     "net.ipv4.tcp_challenge_ack_limit)",
    "connect": "the connecting process is not reported",
    "queued": "deduced from the child reaching ESTABLISHED (tcp_child_process runs after the queue add)",
    "timewait_syn": "collisions with TIME_WAIT sockets are not reported",
}
# Logical hooks the self-test's collision does not exercise (a TIME_WAIT
# collision needs the old connection to have moved more data than the ISN
# clock advanced since): their `verified` stays None.
NOT_SELFTESTED = ("timewait_syn",)


@dataclass(frozen=True)
class Candidate:
    logical: str
    backend: str  # fentry | kprobe | tracepoint
    use: str  # the TC_USE_* macro that compiles it in
    targets: tuple[str, ...]  # kernel functions (first one required) or "category:event"
    needs: tuple[str, ...] = ()  # tracepoint fields the program reads
    probes: tuple[tuple[str, str, str], ...] = ()  # kprobes: (kind, function, BPF function name)
    hook: str = ""  # the enum tc_hook counter (bpf/tcpcollide.h) its programs increment
    where: str = ""  # "return": at the targets' return, where another candidate takes their entry

    @property
    def name(self) -> str:
        return f"{self.backend}:{'+'.join(self.targets)}" + (f"@{self.where}" if self.where else "")


def _tp(logical: str, tp: str, needs: tuple[str, ...], hook: str) -> Candidate:
    return Candidate(logical, "tracepoint", f"TC_USE_TP_{logical.upper()}", (tp,), needs, hook=hook)


CANDIDATES: dict[str, list[Candidate]] = {
    "set_state": [
        Candidate("set_state", "fentry", "TC_USE_FE_SET_STATE", ("tcp_set_state",), hook="TC_HOOK_FE_SET_STATE"),
        Candidate("set_state", "kprobe", "TC_USE_KP_SET_STATE", ("tcp_set_state",),
                  probes=(("kprobe", "tcp_set_state", "tc_kp_set_state"),), hook="TC_HOOK_KP_SET_STATE"),
        _tp("set_state", "sock:inet_sock_set_state", ("skaddr", "oldstate", "newstate", "protocol"),
            "TC_HOOK_TP_SET_STATE"),
    ],
    "syn_challenged": [
        Candidate("syn_challenged", "fentry", "TC_USE_FE_SYN_CHALLENGED", ("tcp_rcv_state_process",),
                  hook="TC_HOOK_FE_RCV_STATE"),
        Candidate("syn_challenged", "kprobe", "TC_USE_KP_SYN_CHALLENGED", ("tcp_rcv_state_process",),
                  probes=(("kprobe", "tcp_rcv_state_process", "tc_kp_rcv_state"),), hook="TC_HOOK_KP_RCV_STATE"),
        _tp("syn_challenged", "skb:kfree_skb", ("reason", "rx_sk"), "TC_HOOK_TP_KFREE_SKB"),
    ],
    "challenge_ack": [
        Candidate("challenge_ack", "fentry", "TC_USE_FE_CHALLENGE", ("tcp_send_challenge_ack",),
                  hook="TC_HOOK_FE_CHALLENGE"),
        Candidate("challenge_ack", "kprobe", "TC_USE_KP_CHALLENGE", ("tcp_send_challenge_ack",),
                  probes=(("kprobe", "tcp_send_challenge_ack", "tc_kp_challenge"),
                          ("kretprobe", "tcp_send_challenge_ack", "tc_kretp_challenge")), hook="TC_HOOK_KP_CHALLENGE"),
        # where tcp_send_challenge_ack is not in BTF (static, as on 5.10): the
        # return of the tcp_rcv_state_process() call that challenged the SYN
        # (the fentry syn_challenged hook marks it); only with that hook
        Candidate("challenge_ack", "fentry", "TC_USE_FE_CHALLENGE_RCV", ("tcp_rcv_state_process",),
                  hook="TC_HOOK_FE_RCV_EXIT", where="return"),
    ],
    "connect": [
        Candidate("connect", "fentry", "TC_USE_FE_CONNECT", ("tcp_v4_connect", "tcp_v6_connect"),
                  hook="TC_HOOK_FE_CONNECT"),
        Candidate("connect", "kprobe", "TC_USE_KP_CONNECT", ("tcp_v4_connect", "tcp_v6_connect"),
                  probes=(("kprobe", "tcp_v4_connect", "tc_kp_connect"), ("kprobe", "tcp_v6_connect", "tc_kp_connect")),
                  hook="TC_HOOK_KP_CONNECT"),
    ],
    "queued": [
        Candidate("queued", "fentry", "TC_USE_FE_QUEUE_ADD", ("inet_csk_reqsk_queue_add",), hook="TC_HOOK_FE_QUEUE_ADD"),
        Candidate("queued", "kprobe", "TC_USE_KP_QUEUE_ADD", ("inet_csk_reqsk_queue_add",),
                  probes=(("kprobe", "inet_csk_reqsk_queue_add", "tc_kp_queue_add"),), hook="TC_HOOK_KP_QUEUE_ADD"),
        Candidate("queued", "fentry", "TC_USE_FE_HASHDANCE", ("inet_csk_complete_hashdance",),
                  hook="TC_HOOK_FE_HASHDANCE"),
        Candidate("queued", "kprobe", "TC_USE_KP_HASHDANCE", ("inet_csk_complete_hashdance",),
                  probes=(("kprobe", "inet_csk_complete_hashdance", "tc_kp_hashdance"),), hook="TC_HOOK_KP_HASHDANCE"),
    ],
    "send_reset": [_tp("send_reset", "tcp:tcp_send_reset", ("skaddr", "skbaddr"), "TC_HOOK_TP_SEND_RESET")],
    "receive_reset": [_tp("receive_reset", "tcp:tcp_receive_reset", ("skaddr",), "TC_HOOK_TP_RECEIVE_RESET")],
    "retransmit": [_tp("retransmit", "tcp:tcp_retransmit_skb", ("skaddr", "state"), "TC_HOOK_TP_RETRANSMIT")],
    "timewait_syn": [_tp("timewait_syn", "skb:kfree_skb", ("skbaddr", "rx_sk"), "TC_HOOK_TP_KFREE_TW")],
}

# The tracepoint programs run as raw tracepoints where the kernel's BTF gives
# each event's prototype (bpf/tracepoints.bpf.c says why): the arguments they
# read, found by C type (`const` ignored) and order among arguments of that
# type. A prototype with more arguments of a wanted type than wanted is
# ambiguous, and the event keeps its classic tracepoint.
RAW_ARGS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "sock:inet_sock_set_state": (("SK", "struct sock *", 0), ("OLDSTATE", "int", 0), ("NEWSTATE", "int", 1)),
    "skb:kfree_skb": (("SKB", "struct sk_buff *", 0), ("REASON", "enum skb_drop_reason", 0),
                      ("RX_SK", "struct sock *", 0)),
    "tcp:tcp_send_reset": (("SK", "struct sock *", 0), ("SKB", "struct sk_buff *", 0)),
    "tcp:tcp_receive_reset": (("SK", "struct sock *", 0),),
    "tcp:tcp_retransmit_skb": (("SK", "struct sock *", 0),),
}


def raw_arg_positions(target: str, args: list[str] | None) -> dict[str, int] | None:
    """{ARG: position} of RAW_ARGS[target] in a prototype's argument types,
    or None (no prototype, an argument missing, or ambiguous)."""
    if args is None or target not in RAW_ARGS:
        return None
    types = [" ".join(t.replace("const ", "").split()) for t in args]
    wanted = RAW_ARGS[target]
    out = {}
    for name, ctype, nth in wanted:
        where = [i for i, t in enumerate(types) if t == ctype]
        if nth >= len(where) or len(where) > sum(1 for _, c, _ in wanted if c == ctype):
            return None
        out[name] = where[nth]
    return out


_WHY_MISSING = {
    ("skb:kfree_skb", "rx_sk"): "skb:kfree_skb names the receiving socket (rx_sk) only since Linux 6.11",
    ("skb:kfree_skb", "reason"): "skb:kfree_skb carries a drop reason only since Linux 5.17",
}


class BackendError(Exception):
    """No candidate can serve a required hook (or a forced backend cannot)."""


@dataclass
class Offer:
    """What the running kernel offers the backends (gathered once)."""

    tracefs: object = None  # Path, or None
    formats: dict[str, capabilities.TracepointFormat | None] = field(default_factory=dict)
    kprobes: bool = False
    kallsyms: dict[str, str] = field(default_factory=dict)  # function -> symbol to attach to
    btf_funcs: set[str] = field(default_factory=set)
    fentry: bool = False
    fentry_note: str = ""
    raw_args: dict[str, dict[str, int]] = field(default_factory=dict)  # tracepoint -> {ARG: position}

    def check(self, c: Candidate) -> str:
        """'' when the kernel offers the candidate, else why not (short: the
        backend-wide reasons are in backend_note())."""
        if c.backend == "tracepoint":
            fmt = self.formats.get(c.targets[0])
            if fmt is None:
                return f"tracepoint {c.targets[0]} does not exist"
            missing = [f for f in c.needs if f not in fmt.fields]
            if missing:
                return _WHY_MISSING.get((c.targets[0], missing[0]), f"{c.targets[0]} has no field {missing[0]}")
            return ""
        if c.backend == "kprobe":
            if not self.kprobes:
                return "unavailable"
            if c.targets[0] not in self.kallsyms:
                return f"no symbol {c.targets[0]} in /proc/kallsyms (inlined or absent)"
            return ""
        if not self.fentry:
            return "unavailable"
        if c.targets[0] not in self.btf_funcs:
            return f"no function {c.targets[0]} in BTF"
        return ""


    def backend_note(self, backend: str) -> str:
        if backend == "kprobe" and not self.kprobes:
            return "this kernel has no kprobes (CONFIG_KPROBES is not set)"
        if backend == "fentry" and not self.fentry:
            return self.fentry_note or "fentry is not available"
        return ""


@dataclass
class Choice:
    logical: str
    candidate: Candidate | None
    note: str = ""  # why the better candidates were not taken, or what happens without one
    verified: bool | None = None  # the self-test saw it fire (None: not tested)

    raw: bool = False  # a tracepoint attached as a raw tracepoint
    lazy: bool = False  # attached only while collisions are in progress (tracer/session.py)

    @property
    def available(self) -> bool:
        return self.candidate is not None

    def as_dict(self) -> dict:
        c = self.candidate
        attach = None
        if c is not None:
            attach = {"fentry": "fentry/fexit", "kprobe": "kprobe"}.get(c.backend) or (
                "raw_tracepoint" if self.raw else "tracepoint")
        return {
            "logical": self.logical,
            "backend": c.backend if c else None,
            "target": c.name.split(":", 1)[1] if c else None,  # "tcp_rcv_state_process@return": at its return
            "attach": attach,
            "lazy": self.lazy,
            "available": c is not None,
            "verified": self.verified,
            "selftested": self.logical not in NOT_SELFTESTED,
            "note": self.note,
        }


@dataclass
class Plan:
    choices: list[Choice]
    offer: Offer

    def choice(self, logical: str) -> Choice:
        return next(c for c in self.choices if c.logical == logical)

    @property
    def selected(self) -> list[Candidate]:
        return [c.candidate for c in self.choices if c.candidate is not None]

    @property
    def backend(self) -> str:
        """The backend serving the required hooks ("mixed" when they differ)."""
        names = {self.choice(h).candidate.backend for h in REQUIRED}
        return names.pop() if len(names) == 1 else "mixed"

    def defines(self) -> dict[str, int]:
        out = {c.use: 1 for c in self.selected}
        if "tcp_v6_connect" in self.offer.btf_funcs:
            out["TC_USE_FE_CONNECT6"] = 1
        if any(c.logical == "challenge_ack" for c in self.selected):
            out["TC_USE_CHALLENGE"] = 1
        for fmt in self.offer.formats.values():
            if fmt is None:
                continue
            event = fmt.name.split(":")[1].upper()
            for name in fmt.fields:
                out[f"TC_HAVE_{event}_{name.upper()}"] = 1
        for target in {c.targets[0] for c in self.selected if c.backend == "tracepoint"}:
            positions = self.offer.raw_args.get(target)
            if positions is not None:
                event = target.split(":")[1].upper()
                out[f"TC_RAW_{event}"] = 1
                out.update({f"TC_RAW_{event}_{arg}": pos for arg, pos in positions.items()})
        return out

    def prelude(self) -> str:
        """Declarations of the kernel enum types the used tracepoints' formats
        name: bcc builds each args struct from the format file, with the
        kernel's type names. Any enum is int-sized, all the layout needs."""
        used = {c.targets[0] for c in self.selected if c.backend == "tracepoint"}
        names = sorted({e for t in used if self.offer.formats.get(t) for e in self.offer.formats[t].enum_types()})
        return "".join(f"enum {n} {{ __tc_{n}_placeholder }};\n" for n in names)

    def kprobes(self) -> list[tuple[str, str, str]]:
        """(kind, symbol, BPF function) to attach by hand, symbols resolved."""
        out = []
        for c in self.selected:
            for kind, func, fn in c.probes:
                sym = self.offer.kallsyms.get(func)
                if sym is not None:
                    out.append((kind, sym, fn))
        return out


def probe_functions() -> set[str]:
    """The kernel functions the kprobe and fentry candidates attach to."""
    return {t for cands in CANDIDATES.values() for c in cands if c.backend != "tracepoint" for t in c.targets}


def gather(btf=None, fentry_probe=None) -> Offer:
    """Look at the running kernel. fentry_probe() -> (works, note) tries it for real."""
    offer = Offer()
    try:
        offer.tracefs = capabilities.tracefs()
    except capabilities.KernelError:
        offer.tracefs = None
    for cands in CANDIDATES.values():
        for c in cands:
            if c.backend == "tracepoint" and c.targets[0] not in offer.formats:
                cat, ev = c.targets[0].split(":")
                offer.formats[c.targets[0]] = capabilities.tracepoint_format(cat, ev, offer.tracefs) if offer.tracefs else None
    offer.kprobes = capabilities.kprobes_available(offer.tracefs)
    wanted = probe_functions()
    # only kprobes attach by symbol (fentry finds its functions in BTF)
    offer.kallsyms = capabilities.resolve_symbols(wanted) if offer.kprobes else {}
    if btf is not None:
        offer.btf_funcs = {f for f in wanted if btf.has_func(f)}
        for target in RAW_ARGS:
            positions = raw_arg_positions(target, btf.tracepoint_args(target.split(":")[1]))
            if positions is not None:
                offer.raw_args[target] = positions
        if fentry_probe is not None:
            offer.fentry, offer.fentry_note = fentry_probe()
        else:
            offer.fentry_note = "fentry not probed"
    else:
        offer.fentry_note = "fentry needs the kernel's BTF"
    return offer


def select(offer: Offer, backend: str = "auto", exclude: set[str] = frozenset()) -> Plan:
    """Choose a candidate per logical hook. `exclude`: candidate names the
    self-test found attached but silent."""
    if backend not in ("auto", *BACKENDS):
        raise BackendError(f"unknown backend {backend!r} (auto, fentry, kprobe, tracepoint)")
    choices = []
    for logical, cands in CANDIDATES.items():
        # a forced backend takes the hooks it has candidates for; the hooks only
        # tracepoints serve (resets, retransmits) keep them
        own = [c for c in cands if c.backend == backend]
        forced = backend != "auto" and bool(own)
        pool = cands if backend == "auto" else (own or [c for c in cands if c.backend == "tracepoint"])
        notes, chosen = [], None
        for c in pool:
            if c.name in exclude:
                notes.append(f"{c.name} attached but never fired")
                continue
            why = offer.check(c)
            if not why and c.use == "TC_USE_FE_CHALLENGE_RCV" and not any(
                    ch.logical == "syn_challenged" and ch.candidate and ch.candidate.use == "TC_USE_FE_SYN_CHALLENGED"
                    for ch in choices):
                why = "the fexit of tcp_rcv_state_process needs the fentry syn_challenged hook"
            if why:
                notes.append(f"{c.backend}: {why}")
                continue
            chosen = c
            break
        if chosen is None and (logical in REQUIRED or forced):
            what = f"backend {backend!r}" if forced else "any backend"
            if logical in REQUIRED:
                why = (forced and offer.backend_note(backend)) or "; ".join(dict.fromkeys(notes))
                raise BackendError(f"{what} cannot see {LOGICAL_HOOKS[logical]}: {why}")
            notes.append(f"forced backend {backend} cannot serve it")
        if chosen is None and logical in WITHOUT:
            notes.append(WITHOUT[logical])
        if chosen is not None and logical in NOT_SELFTESTED:
            notes.append("not exercised by the self-test")
        raw = chosen is not None and chosen.backend == "tracepoint" and chosen.targets[0] in offer.raw_args
        choices.append(Choice(logical, chosen, "; ".join(dict.fromkeys(notes)), raw=raw))
    return Plan(choices, offer)
