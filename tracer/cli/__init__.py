"""The `tcpcollide-trace` command line.

Exit status: 0 success (also after Ctrl-C or SIGTERM), 1 the tracer cannot
run here (not root, no bcc, no BTF and no headers, a hook that cannot attach,
a demo that failed), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from tracer import __version__
from tracer.kernel import hooks, capabilities, program, selftest
from tracer.host import inventory, netns, sockdiag
from tracer.output.dashboard import Dashboard
from tracer.pipeline.replay import ReplayError, replay
from tracer.output.render import JsonWriter, TextWriter, inert
from tracer.session import Options, Session, Stop, attach

EPILOG = """\b
Examples:
  tcpcollide-trace                     trace the whole host until Ctrl-C
  tcpcollide-trace -p 8080 --json      collisions on port 8080, as JSON lines
  tcpcollide-trace --netns 4026532177 -4 -c 1
  tcpcollide-trace demo                reproduce the collision in a private namespace
  tcpcollide-trace inventory           who holds CLOSE_WAIT sockets here, which listeners hold ghosts
  tcpcollide-trace --record run.rec    trace, and keep what the kernel said for a later replay
  tcpcollide-trace replay run.rec      the same reports again, without root or BPF
  tcpcollide-trace top                 a live dashboard

\b
Exit status: 0 success (also after Ctrl-C, SIGTERM, SIGHUP), 1 the tracer
cannot run here or its input is bad (one line on stderr), 2 bad usage.
Shell completion (bash): eval "$(_TCPCOLLIDE_TRACE_COMPLETE=bash_source tcpcollide-trace)"
"""

RUNTIME_ERRORS = (capabilities.KernelError, program.BuildError, hooks.BackendError, netns.NetnsError)


def _port(ctx, param, value):
    if value is not None and not 1 <= value <= 65535:
        raise click.BadParameter(f"{value} is not a TCP port (1-65535)")
    return value


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value} must be greater than 0")
    return value


def _listen(ctx, param, value):
    if value is None:
        return None
    from tracer.output.metrics import parse_listen  # noqa: PLC0415

    try:
        parse_listen(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _family(ipv4: bool, ipv6: bool) -> str | None:
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other (give neither for both)")
    return "ipv4" if ipv4 else "ipv6" if ipv6 else None


def _writer(as_json: bool, no_color: bool):
    return JsonWriter() if as_json else TextWriter(color=False if no_color else None)


def _fail(message: str) -> None:
    click.echo(f"tcpcollide-trace: error: {inert(message)}", err=True)
    sys.exit(1)


def _run(options: Options, sink, on_ready=None, on_idle=None) -> dict | None:
    """Start, stream, detach. None when a signal came before `ready`."""
    session = Session(options, sink)
    with session.signals():
        try:
            session.start()
            if on_ready is not None:
                on_ready()
            return session.run(on_idle)
        except Stop as e:  # a signal between the steps above
            return session.finish(str(e)) if session.ready else None
        except RUNTIME_ERRORS as e:
            _fail(str(e))
        finally:
            session.close()


@click.group(invoke_without_command=True, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--port", type=int, callback=_port, help="Only collisions where either end uses this port.")
@click.option("--netns", type=int, callback=_positive, metavar="INODE",
              help="Only sockets in this network namespace (inode, as `ls -Li /proc/PID/ns/net` shows).")
@click.option("-4", "ipv4", is_flag=True, help="IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="IPv6 only.")
@click.option("--duration", type=float, callback=_positive, metavar="SECONDS", help="Stop after this long.")
@click.option("-c", "--count", type=int, callback=_positive, metavar="N", help="Stop after N collisions.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (schema: docs/json-schema.md).")
@click.option("-v", "--verbose", is_flag=True,
              help="Attach the raw kernel events (hook, backend, CPU, kernel time, socket, states, seq/ack) to each "
                   "collision.")
@click.option("--all-events", is_flag=True,
              help="Also stream every event the kernel side emits (after the filters), as `event` records.")
@click.option("--backend", type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]), default="auto",
              show_default=True, help="Force one backend for the hooks it can serve (auto: the best per hook).")
@click.option("--no-selftest", is_flag=True,
              help="Skip proving that each hook fires (a harmless collision in a private namespace) before ready.")
@click.option("--btf", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Kernel BTF (raw, or a vmlinux ELF with .BTF) instead of /sys/kernel/btf/vmlinux.")
@click.option("--kernel-types", type=click.Choice(["auto", "btf", "headers"]), default="auto", show_default=True,
              help="Where kernel struct offsets and enum values come from (auto: BTF, else headers).")
@click.option("--incident-timeout", type=float, default=15.0, show_default=True, callback=_positive,
              metavar="SECONDS", help="End an incident that never completes after this long.")
@click.option("--state-hook", type=click.Choice(["lazy", "always"]), default="lazy", show_default=True,
              help="Attach the state-change hook only while collisions are in progress (lazy: where it is a raw "
                   "tracepoint, which attaches in microseconds), or keep it attached.")
@click.option("--no-color", is_flag=True, help="No colors in the readable output.")
@click.option("--record", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write what the kernel reported to FILE, for `tcpcollide-trace replay FILE`.")
@click.option("--metrics", callback=_listen, metavar="HOST:PORT",
              help="Serve Prometheus metrics on HOST:PORT (e.g. 0.0.0.0:9465, [::]:9465).")
@click.version_option(__version__, prog_name="tcpcollide-trace")
@click.pass_context
def main(ctx, port, netns, ipv4, ipv6, duration, count, as_json, verbose, all_events, backend, no_selftest, btf,
         kernel_types, incident_timeout, state_hook, no_color, record, metrics):
    """Trace TCP connections whose SYN hits a socket left in CLOSE_WAIT.

    With no command: trace the whole host (all network namespaces, IPv4 and
    IPv6) and report each collision as it completes."""
    options = Options(
        filters=program.Filters(port=port, netns=netns, family=_family(ipv4, ipv6)),
        backend=backend, btf=btf, duration=duration, count=count, verbose=verbose, all_events=all_events,
        incident_timeout=incident_timeout, selftest=not no_selftest, kernel_types=kernel_types, record=record,
        metrics=metrics, state_hook=state_hook,
    )
    ctx.obj = {"options": options, "as_json": as_json, "no_color": no_color}
    if ctx.invoked_subcommand is None:
        _run(options, _writer(as_json, no_color).write)


@main.command(epilog="\b\nExamples:\n  tcpcollide-trace demo\n  tcpcollide-trace --json demo -6")
@click.option("-4", "ipv4", is_flag=True, help="Demonstrate over IPv4 (the default).")
@click.option("-6", "ipv6", is_flag=True, help="Demonstrate over IPv6.")
@click.option("--timeout", type=float, default=30.0, show_default=True, callback=_positive, metavar="SECONDS",
              help="Give up if no collision is reported by then.")
@click.pass_context
def demo(ctx, ipv4, ipv6, timeout):
    """Reproduce the seed's collision in a private namespace while tracing it.

    A listener that never accepts, a client that connects and closes (its
    server end stays in CLOSE_WAIT), then a new client from the same port.
    The namespace is created for the demo and removed afterwards."""
    family = _family(ipv4, ipv6) or "ipv4"
    as_json, no_color = ctx.obj["as_json"], ctx.obj["no_color"]
    writer = _writer(as_json, no_color)
    name = f"tcpcollide-demo-{os.getpid()}"
    ip = "::1" if family == "ipv6" else "127.0.0.1"
    try:
        capabilities.require_root()
        ns = netns.NetNS(name).__enter__()
    except RUNTIME_ERRORS as e:
        _fail(str(e))
    base = ctx.obj["options"]
    options = Options(filters=program.Filters(port=base.filters.port, netns=ns.inode, family=family),
                      backend=base.backend, btf=base.btf, verbose=base.verbose, all_events=base.all_events,
                      incident_timeout=base.incident_timeout, selftest=base.selftest,
                      kernel_types=base.kernel_types, record=base.record, metrics=base.metrics,
                      state_hook=base.state_hook)
    state: dict = {"collisions": 0, "connected": False}

    def sink(rec: dict) -> None:
        state["collisions"] += rec["type"] == "collision"
        writer.write(rec)

    def narrate(line: str) -> None:
        try:
            step = json.loads(line)
        except ValueError:
            return
        state["connected"] |= step["step"] in ("connected", "connect_failed")
        text = f"demo: {step['step']}" + "".join(f" {k}={v}" for k, v in step.items() if k != "step")
        click.echo(inert(text), err=as_json)

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
        summary = _run(options, sink, start_scenario, on_idle)
    finally:
        proc = state.get("proc")
        if proc is not None:
            proc.kill()
            proc.wait()
        ns.delete()
    if summary is not None and summary["collisions"] < 1:
        _fail(f"the demo saw no collision ({summary['stopped_by']})")


def diagnose(backend: str, run_selftest: bool, btf_path: str | None, types_source: str = "auto") -> dict:
    """What this kernel offers and what the tracer would do with it."""
    problems: list[str] = []
    rep: dict = {"type": "doctor", "version": __version__, "kernel": capabilities.release(), "root": os.geteuid() == 0}
    rep["bcc"] = capabilities.bcc_version()
    if rep["bcc"] is None:
        problems.append("bcc is not importable: install python3-bpfcc (scripts/setup does)")
    try:
        rep["tracefs"] = str(capabilities.tracefs(mount=rep["root"]))
    except capabilities.KernelError as e:
        rep["tracefs"] = None
        problems.append(str(e))
    rep["btf"] = btf_path or (str(capabilities.SYSFS_BTF) if capabilities.SYSFS_BTF.exists() else None)
    rep["headers"] = str(capabilities.headers_dir()) if capabilities.headers_dir() else None
    rep["lockdown"] = capabilities.lockdown()
    rep["kprobes"] = capabilities.kprobes_available(rep["tracefs"] and Path(rep["tracefs"]))
    types = None
    try:
        types = program.kernel_types(btf_path, types_source)
        rep["types"] = types.source
    except program.BuildError as e:
        rep["types"] = None
        problems.append(str(e))
    probe = None
    if types is not None and types.btf is not None and rep["root"] and rep["bcc"]:
        probe = lambda: program.fentry_probe(types)  # noqa: E731
    offer = hooks.gather(types.btf if types else None, probe)
    rep["fentry"] = offer.fentry if probe else None
    rep["fentry_note"] = offer.fentry_note if probe else "not probed (needs root, bcc and BTF)"
    plan = None
    if run_selftest and not problems:
        if not rep["root"]:
            problems.append("--selftest needs root")
        else:
            try:
                plan, _, bpf = attach(Options(backend=backend, btf=btf_path, selftest=True, kernel_types=types_source))
                bpf.cleanup()
            except RUNTIME_ERRORS + (selftest.SelftestError,) as e:
                problems.append(str(e))
    if plan is None:
        try:
            plan = hooks.select(offer, backend)
        except hooks.BackendError as e:
            problems.append(str(e))
    rep["backend"] = plan.backend if plan else None
    rep["hooks"] = [c.as_dict() for c in plan.choices] if plan else []
    if not rep["root"]:
        problems.append("not root: the tracer itself must run as root")
    rep["problems"] = list(dict.fromkeys(problems))
    rep["ok"] = not problems
    return rep


@main.command(epilog="\b\nExamples:\n  tcpcollide-trace doctor\n  tcpcollide-trace doctor --selftest --json")
@click.option("--selftest", "run_selftest", is_flag=True,
              help="Also load the programs and prove each hook fires (a harmless collision in a private namespace).")
@click.pass_context
def doctor(ctx, run_selftest):
    """Can the tracer work here, and with which hooks?

    Kernel, BTF and header sources, lockdown, kprobe/fentry/tracepoint
    availability, bcc, and for each logical hook the backend chosen (and with
    --selftest whether it was seen to fire). Exit status 1 when the tracer
    cannot work here, with the reasons."""
    base = ctx.obj["options"]
    rep = diagnose(base.backend, run_selftest, base.btf, base.kernel_types)
    if ctx.obj["as_json"]:
        JsonWriter().write(rep)
    else:
        TextWriter(color=False if ctx.obj["no_color"] else None).write(rep)
    if not rep["ok"]:
        sys.exit(1)


@main.command("inventory", epilog="\b\nExamples:\n  tcpcollide-trace inventory\n  tcpcollide-trace -p 8080 --json inventory")
@click.pass_context
def inventory_cmd(ctx):
    """Who is leaking sockets here, without waiting for a collision.

    A snapshot of every network namespace: the CLOSE_WAIT sockets grouped by
    the process holding them and their local port, with their ages (since
    each last received an ACK) and unread bytes, and the listeners whose
    accept queue holds dead children (ghosts) or is full. Uses sock_diag and
    /proc, no BPF; root sees every namespace and process. The -p, --netns,
    -4 and -6 options filter it."""
    base = ctx.obj["options"]
    try:
        capabilities.require_root("to see every namespace and process")
        rep = inventory.snapshot(base.filters.port, base.filters.netns, base.filters.family)
    except (capabilities.KernelError, sockdiag.SockDiagError, OSError) as e:
        _fail(str(e))
    _writer(ctx.obj["as_json"], ctx.obj["no_color"]).write(rep)


@main.command("replay", epilog="\b\nExamples:\n  tcpcollide-trace replay run.rec\n  tcpcollide-trace --json -v replay run.rec")
@click.argument("recording", type=click.Path(dir_okay=False))
@click.pass_context
def replay_cmd(ctx, recording):
    """Replay a recording made with --record: the same reports, without root or BPF.

    The recorded events go through the same correlator as they did live, with
    the host context recorded for each incident; --json, -v and --no-color
    apply. A damaged recording is replayed up to the damage, then the error
    names its byte offset (exit status 1)."""
    writer = _writer(ctx.obj["as_json"], ctx.obj["no_color"])
    try:
        replay(recording, writer.write, ctx.obj["options"].verbose, ctx.obj["options"].all_events)
    except ReplayError as e:
        _fail(str(e))


@main.command("top", epilog="\b\nExamples:\n  tcpcollide-trace top\n  tcpcollide-trace -p 8080 top")
@click.pass_context
def top(ctx):
    """A live dashboard: collisions as they complete, counters by outcome,
    server port, culprit process and client, CLOSE_WAIT sockets and ghosts
    per listener, events per second, lost events and the backend.

    Redraws in place (80x24 is enough); plain lines when stdout is not a
    terminal. The filters (-p, --netns, -4, -6) apply. Ctrl-C to stop."""
    from rich.console import Console  # noqa: PLC0415

    console = Console(highlight=False, markup=False, emoji=False,
                      no_color=ctx.obj["no_color"] or None)
    dash = Dashboard(console)

    def on_idle(session):
        dash.tick(session.correlator.events_seen, session.correlator.lost_events)
        return None

    try:
        _run(ctx.obj["options"], dash.write, dash.start, on_idle)
    finally:
        dash.stop()

