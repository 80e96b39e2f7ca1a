"""`tcpcollide-trace demo`: the original write-up's first experiment, traced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click

from tracer.cli.live import live_output, run, session_options
from tracer.cli.options import LOADING, RUNTIME_ERRORS, Command, examples, fail, family, option, positive, takes
from tracer.host import netns
from tracer.kernel import capabilities, program
from tracer.output.render import inert

EXAMPLES = examples(
    ("tcpcollide-trace demo", "the collision over IPv4 on loopback, as a readable report"),
    ("tcpcollide-trace demo -6 --json", "the same over IPv6, as JSON lines (narration on stderr)"),
    ("tcpcollide-trace demo -v --record demo.rec", "with the raw kernel events, recorded for a replay"),
)


@click.command("demo", cls=Command, epilog=EXAMPLES)
@option("ipv4")
@option("ipv6")
@click.option("--timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
              callback=positive,
              help="Give up if no collision is reported by then.")
@takes("as_json", "verbose", "all_events", *LOADING, "incident_timeout", "record", "metrics", "web_config", "no_color")
def demo(ipv4, ipv6, timeout, as_json, no_color, **params):
    """Reproduce a CLOSE_WAIT port collision in a private namespace, and trace it.

    The first experiment of the write-up this tool grew from, "When a new
    connection's source port collides with a port held by a CLOSE_WAIT
    socket" (当新连接源端口和 CLOSE_WAIT 状态占用端口发生碰撞时): a listener
    that never accepts, a client that connects and closes (the server's end
    stays in CLOSE_WAIT), then a new client from the same port, whose SYN
    meets the CLOSE_WAIT socket. The namespace is created for the demo and
    removed afterwards. The demo ends once the collision is reported (exit
    status 1 when none is within --timeout)."""
    fam = family(ipv4, ipv6) or "ipv4"
    out, stream = live_output(as_json, no_color)
    name = f"tcpcollide-demo-{os.getpid()}"
    ip = "::1" if fam == "ipv6" else "127.0.0.1"
    try:
        capabilities.require_root()
        ns = netns.NetNS(name, fin_timeout=None).__enter__()  # the scenario sets its own (TCP_LINGER2)
    except RUNTIME_ERRORS as e:
        fail(str(e))
    options = session_options(params, filters=program.Filters(netns=ns.inode, family=fam))
    state: dict = {"collisions": 0, "connected": False}

    def sink(rec: dict) -> None:
        state["collisions"] += rec["type"] == "collision"
        out.write(rec)

    def narrate(line: str) -> None:
        try:
            step = json.loads(line)
        except ValueError:
            return
        state["connected"] |= step["step"] in ("connected", "connect_failed")
        text = f"demo: {step['step']}" + "".join(f" {k}={v}" for k, v in step.items() if k != "step")
        if as_json:
            click.echo(inert(text), err=True)
        else:
            click.echo(inert(text), file=stream)  # None: sys.stdout

    def start_scenario():
        state["deadline"] = time.monotonic() + timeout
        state["proc"] = subprocess.Popen(
            [sys.executable, "-m", "tracer.host.scenario", "--server-ns", name, "--server-ip", ip, "--client-ip", ip,
             "--hold", "2"], stdout=subprocess.PIPE, text=True, bufsize=1)
        os.set_blocking(state["proc"].stdout.fileno(), False)

    def on_idle(_session):
        proc = state["proc"]
        for line in proc.stdout.readlines():
            narrate(line)
        if state["collisions"] and state["connected"]:
            return "demo done"
        if proc.poll() not in (None, 0):
            return "scenario failed"
        if time.monotonic() > state["deadline"]:
            return "timeout"
        return None

    try:
        summary = run(options, sink, start_scenario, on_idle, flush=out.flush, stream=stream)
    finally:
        proc = state.get("proc")
        if proc is not None:
            proc.kill()
            proc.wait()
        ns.delete()
    if summary is not None and summary["collisions"] < 1:
        fail(f"the demo saw no collision ({summary['stopped_by']})")
