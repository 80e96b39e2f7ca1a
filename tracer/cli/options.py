"""The command line's options, each defined once, and the rule that binds
them to subcommands.

Every option is declared here and taken by name by the subcommands it
applies to (`@takes("port", "json", ...)`). The group also accepts every one
of them, hidden, so that 0.4's form (`tcpcollide-trace --json doctor`) keeps
working: a value given before the subcommand is handed to the subcommand
(`Command.invoke`), and is a usage error when the subcommand does not take
that option, or takes it with a different value after its name.
"""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from tracer.host import netns, workload
from tracer.kernel import capabilities, hooks, program
from tracer.output.render import JsonWriter, TextWriter, inert
from tracer.selftest import SelftestError
from tracer.pipeline.correlator import Settings

PROG = "tcpcollide-trace"
GIVEN = "tcpcollide.given"  # ctx.meta key: {param name: (value, label)} given before the subcommand
RUNTIME_ERRORS = (capabilities.KernelError, program.BuildError, hooks.BackendError, netns.NetnsError,
                  workload.SelectionError, SelftestError)
EXIT_STATUS = ("Exit status: 0 success (also after Ctrl-C, SIGTERM, SIGHUP), 1 the tracer\n"
               "cannot run here or its input is bad (one line on stderr), 2 bad usage.")


def _port(ctx, param, value):
    if value is not None and not 1 <= value <= 65535:
        raise click.BadParameter(f"{value} is not a TCP port (1-65535)")
    return value


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value} must be greater than 0")
    return value


def _checked(value, check, errors):
    """`value`, or click's one-line error with what check(value) raised."""
    try:
        check(value)
    except errors as e:
        raise click.BadParameter(str(e)) from None
    return value


def _listen(ctx, param, value):
    if value is None:
        return None
    from tracer.output.metrics import parse_listen  # noqa: PLC0415 - prometheus_client only when asked for

    return _checked(value, parse_listen, ValueError)


def _web_config(ctx, param, value):
    if value is None:
        return None
    from tracer.output.webconfig import WebConfigError, load  # noqa: PLC0415 - yaml only when asked for

    return _checked(value, load, WebConfigError)


def _selectors(kind: str):
    def check(ctx, param, values):
        for v in values:
            try:
                workload.Selector(kind, v)
            except workload.SelectorError as e:
                raise click.BadParameter(str(e)) from None
        return values
    return check


# name -> (declarations, keyword arguments of click.option)
OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "port": (("-p", "--port"), dict(type=int, callback=_port, metavar="PORT",
                                    help="Only collisions (sockets) where either end uses this port.")),
    "netns": (("--netns",), dict(type=int, callback=positive, metavar="INODE",
                                 help="Only sockets in this network namespace (inode, as `ls -Li /proc/PID/ns/net` "
                                      "shows).")),
    "container": (("--container",), dict(
        multiple=True, callback=_selectors("container"), metavar="NAME|ID",
        help="Only collisions of this container (its name, or its id or a prefix of 12+ hex digits; docker, podman, "
             "containerd, CRI-O): in its network namespace, applied in the kernel. Repeat for more.")),
    "pod": (("--pod",), dict(
        multiple=True, callback=_selectors("pod"), metavar="NAMESPACE/NAME",
        help="Only collisions of this Kubernetes pod (or its UID), as the kubelet's /var/log/pods names it: in "
             "its network namespace, applied in the kernel. Repeat for more.")),
    "unit": (("--unit",), dict(
        multiple=True, callback=_selectors("unit"), metavar="UNIT",
        help="Only collisions of this systemd unit or slice (nginx: nginx.service). Repeat for more.")),
    "ipv4": (("-4", "ipv4"), dict(is_flag=True, help="IPv4 only.")),
    "ipv6": (("-6", "ipv6"), dict(is_flag=True, help="IPv6 only.")),
    "duration": (("--duration",), dict(type=float, callback=positive, metavar="SECONDS",
                                       help="Stop after this long.")),
    "count": (("-c", "--count"), dict(type=int, callback=positive, metavar="N", help="Stop after N collisions.")),
    "as_json": (("--json", "as_json"), dict(is_flag=True, help="JSON lines on stdout (schema: docs/json-schema.md).")),
    "verbose": (("-v", "--verbose"), dict(
        is_flag=True, help="Attach the raw kernel events (hook, backend, CPU, kernel time, socket, states, seq/ack) "
                           "to each collision.")),
    "all_events": (("--all-events",), dict(
        is_flag=True, help="Also stream every event the kernel side emits (after the filters), as `event` records.")),
    "backend": (("--backend",), dict(
        type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]), default="auto", show_default=True,
        help="Force one backend for the hooks it can serve (auto: the best per hook).")),
    "no_selftest": (("--no-selftest",), dict(
        is_flag=True, help="Skip proving that each hook fires (a harmless collision in a private namespace) before "
                           "ready.")),
    "btf": (("--btf",), dict(type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                             help="Kernel BTF (raw, or a vmlinux ELF with .BTF) instead of /sys/kernel/btf/vmlinux.")),
    "kernel_types": (("--kernel-types",), dict(
        type=click.Choice(["auto", "btf", "headers"]), default="auto", show_default=True,
        help="Where kernel struct offsets and enum values come from (auto: BTF, else headers).")),
    "incident_timeout": (("--incident-timeout",), dict(
        type=float, default=None, callback=positive, metavar="SECONDS",
        help=f"End an incident that never completes after this long  [default: {Settings.timeout_ns / 1e9:g}]")),
    "state_hook": (("--state-hook",), dict(
        type=click.Choice(["lazy", "always"]), default="lazy", show_default=True,
        help="Attach the state-change hook only while collisions are in progress (lazy: where it is a raw "
             "tracepoint, which attaches in microseconds), or keep it attached.")),
    "no_color": (("--no-color",), dict(is_flag=True, help="No colors in the readable output.")),
    "record": (("--record",), dict(type=click.Path(dir_okay=False, writable=True), metavar="FILE",
                                   help="Also write what the kernel reported to FILE, for `tcpcollide-trace replay "
                                        "FILE`.")),
    "metrics": (("--metrics",), dict(callback=_listen, metavar="HOST:PORT",
                                     help="Serve Prometheus metrics on HOST:PORT (e.g. 0.0.0.0:9465, [::]:9465).")),
    "web_config": (("--web-config",), dict(
        callback=_web_config, metavar="FILE",
        help="TLS and basic authentication for --metrics, in the format of Prometheus's exporter-toolkit "
             "(tls_server_config, basic_auth_users with bcrypt hashes), as node_exporter reads it.")),
    "journal": (("--journal",), dict(
        is_flag=True, help="Write each record to the systemd journal as an entry with TCPCOLLIDE_* fields, not to "
                           "stdout (the default when $JOURNAL_STREAM says stdout is the journal).")),
}

# The options of a tracing run, shared by trace, demo and top.
LOADING = ("backend", "no_selftest", "btf", "kernel_types", "state_hook")
FILTERS = ("port", "netns", "ipv4", "ipv6")
WORKLOAD_FILTERS = ("container", "pod", "unit")  # resolved to namespaces: trace and top


def option(name: str, hidden: bool = False, **overrides):
    """The named option; overrides: keyword arguments of click.option that
    differ for one subcommand (a help text that reads differently there)."""
    decls, kwargs = OPTIONS[name]
    return click.option(*decls, hidden=hidden, **{**kwargs, **overrides})


def takes(*names: str):
    """Decorate a command with the named options, in the order given."""
    def wrap(f):
        for name in reversed(names):
            f = option(name)(f)
        return f
    return wrap


def _label(param: click.Parameter) -> str:
    return "/".join(param.opts)


def _shown(value) -> str:
    return "on" if value is True else str(value)


def remember_given(ctx: click.Context) -> None:
    """Called by the group: keep the options the user gave before the
    subcommand (on the command line or from the environment)."""
    given = {}
    for param in ctx.command.params:
        if isinstance(param, click.Option) and param.name in OPTIONS and ctx.get_parameter_source(param.name) in (
                ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            given[param.name] = (ctx.params[param.name], _label(param))
    ctx.meta[GIVEN] = given


class Command(click.Command):
    """A subcommand that takes the group's options given before its name,
    where they apply to it."""

    def invoke(self, ctx: click.Context):
        own = {p.name for p in self.params}
        for name, (value, label) in ctx.meta.get(GIVEN, {}).items():
            if name not in own:
                raise click.UsageError(f"option {label} does not apply to '{self.name}' "
                                       f"(see: {PROG} {self.name} --help)", ctx)
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                if ctx.params[name] != value:
                    raise click.UsageError(
                        f"option {label} is given before '{self.name}' as {_shown(value)} and after it as "
                        f"{_shown(ctx.params[name])}", ctx)
            else:
                ctx.params[name] = value
        return super().invoke(ctx)


def family(ipv4: bool, ipv6: bool) -> str | None:
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other (give neither for both)")
    return "ipv4" if ipv4 else "ipv6" if ipv6 else None


def filters(port=None, netns=None, ipv4=False, ipv6=False, container=(), pod=(), unit=(), **_) -> program.Filters:
    workloads = tuple(("container", v) for v in container) + tuple(("pod", v) for v in pod) + tuple(
        ("unit", v) for v in unit)
    return program.Filters(port=port, netns=netns, family=family(ipv4, ipv6), workloads=workloads)


def writer(as_json: bool, no_color: bool, batched: bool = False, out=None):
    """batched: JSON lines flushed by the caller (writer.flush), not each.
    out: the stream (default sys.stdout; a live session's is tracer/output/stream.py's)."""
    out = sys.stdout if out is None else out
    return JsonWriter(out, flush_each=not batched) if as_json else TextWriter(out, color=False if no_color else None)


def fail(message: str) -> None:
    """The one-line error of exit status 1."""
    click.echo(f"{PROG}: error: {inert(message)}", err=True)
    sys.exit(1)


def examples(*lines: tuple[str, str]) -> str:
    """An examples epilog; each (command, what it does). tests/test_cli.py runs every one."""
    width = max(len(c) for c, _ in lines)
    body = "\n".join(f"  {c:<{width}}  {what}".rstrip() for c, what in lines)
    return f"\b\nExamples:\n{body}"
