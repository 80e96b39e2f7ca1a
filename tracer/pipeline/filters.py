"""What the operator asked to see: the filters of a live run (applied in the
kernel, map `filters`) and of a replay (applied to the recorded events, by
the same test)."""

from __future__ import annotations

from dataclasses import dataclass

AF_BY_NAME = {"ipv4": 2, "ipv6": 10}


@dataclass(frozen=True)
class Filters:
    """What the operator asked to see: applied in the kernel live, to the
    recorded events in a replay (passes())."""

    port: int | None = None
    netns: int | None = None
    family: str | None = None  # "ipv4" / "ipv6"
    # --container/--pod/--unit as ((kind, value), ...): only the namespaces
    # user space puts in map `netns_allowed` (tracer/host/workload.py Selection)
    workloads: tuple[tuple[str, str], ...] = ()

    def apply(self, bpf) -> None:
        """Write the filters into the loaded program's map `filters`
        (bpf/collide/maps.bpf.h struct tc_filters; 0 is no filter): values,
        not compile-time constants, so one compiled object serves them all."""
        table = bpf["filters"]
        value = table.Leaf()
        value.port = self.port or 0
        value.netns = self.netns or 0
        value.family = AF_BY_NAME[self.family] if self.family else 0
        value.netns_set = 1 if self.workloads else 0
        table[table.Key(0)] = value

    @property
    def any(self) -> bool:
        return bool(self.port or self.netns or self.family or self.workloads)

    def passes(self, ev) -> bool:
        """Whether a recorded event (tracer/pipeline/events.py) passes the
        port, namespace and family filters: the kernel's own test
        (tc_fill_sock_tw in bpf/collide/sock.bpf.h), for a replay given the
        filters a live run takes. Workload filters are namespaces the live
        host resolved, which a recording does not keep: a replay applies them
        to the processes each collision names (flow.selected)."""
        if self.port and ev.lport != self.port and ev.rport != self.port:
            return False
        if self.netns and ev.netns != self.netns:
            return False
        return not self.family or ev.family == AF_BY_NAME[self.family]

    def as_dict(self) -> dict:
        return {"port": self.port, "netns": self.netns, "family": self.family,
                "workloads": [{kind: value} for kind, value in self.workloads]}
