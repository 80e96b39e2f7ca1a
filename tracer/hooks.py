"""Hook selection: which kernel hook serves each logical hook on this kernel.

A logical hook is something the collision logic needs to see (a socket
changing state, a SYN challenged by a non-listening socket, ...). A backend
offers kernel hooks for some of them; selection takes what the running kernel
really has, and says plainly what it could not find.

Today the tracepoint backend (bpf/tracepoints.bpf.c) serves every logical hook
on kernels >= 6.11; the kprobe and fentry backends will sit beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tracer import kernel

# logical hook -> what it is for (the words the operator reads)
LOGICAL_HOOKS = {
    "set_state": "TCP state changes (CLOSE_WAIT sockets, the RST's victim, the new connection)",
    "syn_challenged": "a SYN challenged by a non-listening socket (the collision itself)",
    "send_reset": "the client's RST answering the challenge ACK",
    "receive_reset": "the lingering socket receiving that RST",
    "retransmit": "the client's retried SYN",
}
REQUIRED = ("set_state", "syn_challenged")


@dataclass(frozen=True)
class Tracepoint:
    category: str
    event: str
    needs: tuple[str, ...]  # fields the program reads

    @property
    def name(self) -> str:
        return f"{self.category}:{self.event}"


@dataclass
class HookChoice:
    logical: str
    backend: str | None  # None: nothing on this kernel can serve it
    target: str  # the kernel hook ("sock:inet_sock_set_state")
    note: str = ""  # why it is missing, or a caveat

    @property
    def available(self) -> bool:
        return self.backend is not None


class BackendError(Exception):
    """No backend can serve a required hook on this kernel."""


TRACEPOINTS = {
    "set_state": Tracepoint("sock", "inet_sock_set_state", ("skaddr", "oldstate", "newstate", "protocol")),
    "syn_challenged": Tracepoint("skb", "kfree_skb", ("reason", "rx_sk")),
    "send_reset": Tracepoint("tcp", "tcp_send_reset", ("skaddr", "skbaddr")),
    "receive_reset": Tracepoint("tcp", "tcp_receive_reset", ("skaddr",)),
    "retransmit": Tracepoint("tcp", "tcp_retransmit_skb", ("skaddr", "state")),
}

_WHY_MISSING = {
    ("syn_challenged", "rx_sk"): "skb:kfree_skb names the receiving socket (rx_sk) only since Linux 6.11",
    ("syn_challenged", "reason"): "skb:kfree_skb carries a drop reason only since Linux 5.17",
}


@dataclass
class TracepointPlan:
    """The tracepoint backend's choices and the compile-time facts they need."""

    choices: list[HookChoice]
    formats: dict[str, kernel.TracepointFormat] = field(default_factory=dict)

    def defines(self) -> dict[str, int]:
        """TC_HAVE_<EVENT>_<FIELD> for every field of every used tracepoint."""
        out = {}
        for fmt in self.formats.values():
            event = fmt.name.split(":")[1].upper()
            for name in fmt.fields:
                out[f"TC_HAVE_{event}_{name.upper()}"] = 1
        return out

    def prelude(self) -> str:
        """Declarations of the kernel enum types the formats name: bcc builds
        each args struct from its format file, with the kernel's type names.
        Any enum is int-sized, which is all the struct layout needs."""
        names = sorted({e for fmt in self.formats.values() for e in fmt.enum_types()})
        return "".join(f"enum {n} {{ __tc_{n}_placeholder }};\n" for n in names)


def plan_tracepoints() -> TracepointPlan:
    """Check every tracepoint the backend uses against tracefs."""
    root = kernel.tracefs()
    plan = TracepointPlan(choices=[])
    for logical, tp in TRACEPOINTS.items():
        fmt = kernel.tracepoint_format(tp.category, tp.event, root)
        if fmt is None:
            plan.choices.append(HookChoice(logical, None, tp.name, f"tracepoint {tp.name} does not exist"))
            continue
        missing = [f for f in tp.needs if f not in fmt.fields]
        if missing:
            why = _WHY_MISSING.get((logical, missing[0]), f"tracepoint {tp.name} has no field {missing[0]}")
            plan.choices.append(HookChoice(logical, None, tp.name, why))
            continue
        plan.formats[logical] = fmt
        plan.choices.append(HookChoice(logical, "tracepoint", tp.name))
    return plan


def select(backend: str = "auto") -> TracepointPlan:
    """Choose hooks; raise BackendError when a required one cannot be served."""
    if backend not in ("auto", "tracepoint"):
        raise BackendError(f"backend {backend!r} is not available in this version (only 'tracepoint')")
    plan = plan_tracepoints()
    for c in plan.choices:
        if c.logical in REQUIRED and not c.available:
            raise BackendError(f"cannot see {LOGICAL_HOOKS[c.logical]}: {c.note}")
    return plan


def source_tracepoint_names(source: str) -> set[str]:
    """The tracepoints a BPF source attaches to (for consistency checks)."""
    return {f"{c}:{e}" for c, e in re.findall(r"TRACEPOINT_PROBE\((\w+),\s*(\w+)\)", source)}
