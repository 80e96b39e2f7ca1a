"""Proof that hooks fire, not only attach.

A kprobe on an inlined function attaches and never fires (seen on Debian 6.1
with inet_csk_reqsk_queue_add). So before `ready`, the tracer makes one
harmless collision of its own in a private network namespace and reads the
per-hook counters the BPF programs keep (map `hook_fired`): a selected hook
whose counter did not move is silent.
"""

from __future__ import annotations

import os
import signal
import time

from tracer.host import netns, scenario
from tracer.pipeline.events import ENUMS
from tracer.kernel.hooks import NOT_SELFTESTED, Candidate, Plan

HOOK_IDS = ENUMS["tc_hook"]


class SelftestError(Exception):
    pass


def counters(bpf) -> dict[int, int]:
    table = bpf["hook_fired"]  # per CPU
    return {k.value: table.sum(k).value for k in table.keys()}


def collide(timeout: float = 10.0) -> None:
    """A fast collision (scenario --fast, with short pauses) in a network
    namespace of its own, in a forked child: no interpreter to start, no
    iproute2, and the namespace goes when the child exits; ports above 1023,
    so that it needs no CAP_NET_BIND_SERVICE. Its events never
    reach user space (the perf buffer is not open yet); the counters move."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report failures on the pipe, never return
        code = 1
        try:
            os.close(r)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)  # the scenario narrates on stdout: not ours to print
            netns.unshare()
            netns.loopback_up()
            args = scenario.parser().parse_args(
                ["--fast", "--server-port", "9009", "--client-port", "9999", "--before-close", "0",
                 "--age", "0", "--hold", "0", "--connect-timeout", str(timeout), "--port-wait", "1"])
            code = scenario.run(args)
            if code:
                os.write(w, f"the scenario exited with {code}".encode())
        except BaseException as e:  # noqa: BLE001 - anything is a failed self-test, said on the pipe
            os.write(w, f"{type(e).__name__}: {e}".encode()[:300])
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            said = pipe.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        raise SelftestError(f"the self-test collision failed: {said or 'exit status ' + str(status)}"[:300])


def silent(plan: Plan, before: dict[int, int], after: dict[int, int]) -> list[Candidate]:
    """The selected candidates whose hook counter did not move."""
    return [c for c in plan.selected if c.logical not in NOT_SELFTESTED
            and after.get(HOOK_IDS[c.hook], 0) <= before.get(HOOK_IDS[c.hook], 0)]


def run(plan: Plan, bpf, settle: float = 0.5) -> list[Candidate]:
    """Make the collision; return the selected candidates that stayed silent.
    Hooks that run in softirq (the server's side) may still be on their way
    when the child exits, on a loaded host: the counters are read until every
    hook has moved, for at most `settle` seconds (the price of a truly silent
    hook, once, at start-up)."""
    before = counters(bpf)
    collide()
    deadline = time.monotonic() + settle
    while True:
        quiet = silent(plan, before, counters(bpf))
        if not quiet or time.monotonic() >= deadline:
            return quiet
        time.sleep(0.005)
