"""Proof that hooks fire, not only attach.

A kprobe on an inlined function attaches and never fires (seen on Debian 6.1
with inet_csk_reqsk_queue_add). So before `ready`, the tracer makes one
harmless collision of its own in a private network namespace and reads the
per-hook counters the BPF programs keep (map `hook_fired`): a selected hook
whose counter did not move is silent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tracer import netns
from tracer.events import ENUMS
from tracer.hooks import NOT_SELFTESTED, Candidate, Plan

HOOK_IDS = ENUMS["tc_hook"]


class SelftestError(Exception):
    pass


def counters(bpf) -> dict[int, int]:
    table = bpf["hook_fired"]  # per CPU
    return {k.value: table.sum(k).value for k in table.keys()}


def collide(on_netns=None, timeout: float = 10.0) -> None:
    """A fast collision (scenario --fast) in a namespace of its own, removed
    afterwards. on_netns(inode) is told the namespace before anything happens
    in it, so its events can be set aside: they are the self-test's."""
    with netns.NetNS(f"tcpcollide-selftest-{os.getpid()}") as ns:
        if on_netns is not None:
            on_netns(ns.inode)
        r = subprocess.run(
            [sys.executable, "-m", "tracer.scenario", "--server-ns", ns.name, "--fast", "--hold", "0.05",
             "--server-port", "9", "--client-port", "9999"],
            capture_output=True, text=True, timeout=timeout,
        )
        if r.returncode != 0:
            raise SelftestError(f"the self-test collision failed: {r.stdout.strip()} {r.stderr.strip()}"[:300])


def silent(plan: Plan, before: dict[int, int], after: dict[int, int]) -> list[Candidate]:
    """The selected candidates whose hook counter did not move."""
    return [c for c in plan.selected if c.logical not in NOT_SELFTESTED
            and after.get(HOOK_IDS[c.hook], 0) <= before.get(HOOK_IDS[c.hook], 0)]


def run(plan: Plan, bpf) -> list[Candidate]:
    """Make the collision; return the selected candidates that stayed silent."""
    before = counters(bpf)
    collide()
    time.sleep(0.02)  # the last hooks (the child's ESTABLISHED) run in softirq
    return silent(plan, before, counters(bpf))
