"""What the kernel counted of collisions (bpf/tcpcollide.h: enum tc_stat, map
`stats`; map `counts` by network namespace, server port and lingering state),
whatever reached user space: the true numbers next to the timelines that
could be followed."""

from __future__ import annotations

from tracer.pipeline.events import ENUMS

STATS = {name.removeprefix("TC_STAT_").lower(): n for name, n in ENUMS["tc_stat"].items() if name != "TC_STAT_MAX"}
# the names the records give them
NAMES = {"collisions": "collisions", "syn_hits": "syn_hits", "not_submitted": "events_not_submitted",
         "untracked": "untracked", "uncounted": "uncounted", "not_streamed": "events_not_streamed",
         "state_covered": "state_runs_covered", "track_added": "tracked_added"}
FAMILIES = {2: "ipv4", 10: "ipv6"}


class KernelCounts:
    def __init__(self, bpf, states: dict[int, str]):
        self.stats = bpf["stats"]
        self.counts = bpf["counts"]
        self.states = states
        self._base = {name: 0 for name in STATS}

    def reset(self) -> None:
        """From now on (after the self-test's collision)."""
        self.counts.clear()
        self._base = self._totals(raw=True)

    def _totals(self, raw: bool = False) -> dict[str, int]:
        out = {}
        for name, index in STATS.items():
            total = sum(self.stats[self.stats.Key(index)])
            out[name] = total if raw else total - self._base[name]
        return out

    def refused(self) -> int:
        """Events the perf buffer refused so far: one lookup, cheap enough for every poll."""
        index = STATS["not_submitted"]
        return sum(self.stats[self.stats.Key(index)]) - self._base["not_submitted"]

    def state_covered(self) -> int:
        """Runs of the state hook the kernel skipped and its twin ran, since
        the load (bpf/tracepoints.bpf.c): one lookup."""
        return sum(self.stats[self.stats.Key(STATS["state_covered"])])

    def tracked_added(self) -> int:
        """Entries the programs added to map `tracked` since reset(): one lookup."""
        index = STATS["track_added"]
        return sum(self.stats[self.stats.Key(index)]) - self._base["track_added"]

    def syn_hits(self) -> int:
        """SYNs the kernel saw challenged so far (past the filters), whether
        or not their events reached user space: one lookup, for every poll."""
        index = STATS["syn_hits"]
        return sum(self.stats[self.stats.Key(index)]) - self._base["syn_hits"]

    def read(self) -> dict:
        """The counts so far: totals, and per (network namespace, server
        port, lingering state) busiest first (records.Summary.kernel() makes
        the `kernel` part of a record of them)."""
        totals = self._totals()
        rows = []
        for key, per_cpu in self.counts.items():
            rows.append({
                "netns": key.netns, "family": FAMILIES.get(key.family, str(key.family)),
                "server_port": key.sport, "lingering_state": self.states.get(key.state, str(key.state)),
                "collisions": sum(c.collisions for c in per_cpu), "syn_hits": sum(c.syn_hits for c in per_cpu),
            })
        rows.sort(key=lambda r: (-r["collisions"], -r["syn_hits"], r["netns"], r["server_port"]))
        out = {NAMES[k]: v for k, v in totals.items()}
        out["by_server"] = rows  # busiest first
        return out
