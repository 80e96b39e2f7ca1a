"""The `tcpcollide-trace` command line: one module per subcommand.

`trace` is the default subcommand, so `tcpcollide-trace -p 8080 --json`
traces. Options belong to the subcommands that use them and follow their
names (`tcpcollide-trace doctor --selftest --json`); given before the
subcommand (0.4's form) they still apply where the subcommand takes them
(tracer/cli/options.py).

Exit status: 0 success (also after Ctrl-C or SIGTERM), 1 the tracer cannot
run here (not root, no bcc, no BTF and no headers, a hook that cannot attach,
a demo that failed, a damaged recording), 2 bad usage.
"""

from __future__ import annotations

import click

from tracer import __version__
from tracer.cli.demo import demo
from tracer.cli.doctor import doctor
from tracer.cli.inventory import inventory_cmd
from tracer.cli.options import EXIT_STATUS, OPTIONS, PROG, examples, option, remember_given
from tracer.cli.replay import replay_cmd
from tracer.cli.top import top
from tracer.cli.trace import trace
from tracer.host import netns  # noqa: F401 - tests replace netns.NetNS through this module

EPILOG = examples(
    ("tcpcollide-trace", "trace the whole host until Ctrl-C (the trace command)"),
    ("tcpcollide-trace -p 8080 --json", "collisions on port 8080, as JSON lines"),
    ("tcpcollide-trace demo", "reproduce the collision in a private namespace: run this first"),
    ("tcpcollide-trace doctor --selftest", "can the tracer work here, and does each hook fire?"),
    ("tcpcollide-trace inventory -p 8080", "who holds CLOSE_WAIT sockets here, which listeners hold ghosts"),
    ("tcpcollide-trace trace --record run.rec", "trace, and keep what the kernel said for a later replay"),
    ("tcpcollide-trace replay run.rec --json", "the same reports again, without root or BPF"),
    ("tcpcollide-trace top", "a live dashboard"),
) + f"""

\b
Each command has its own options: {PROG} COMMAND --help.
{EXIT_STATUS}
Shell completion (bash): eval "$(_TCPCOLLIDE_TRACE_COMPLETE=bash_source tcpcollide-trace)"
"""


def _group_options(f):
    for name in reversed(OPTIONS):
        f = option(name, hidden=True)(f)
    return f


@click.group(invoke_without_command=True, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@_group_options
@click.version_option(__version__, prog_name=PROG)
@click.pass_context
def main(ctx, **_given):
    """Trace TCP connections whose SYN hits a socket left in CLOSE_WAIT.

    A server that never closes a socket after its peer hung up leaves it in
    CLOSE_WAIT, holding the connection's ports. A client that later reuses
    that source port meets the old socket instead of the listener: a
    challenge ACK, a reset, a retried SYN, and a connection that is late by
    milliseconds to seconds. This tool watches the kernel for exactly that,
    names the socket and the process that leaked it, and says what it cost.

    With no command: trace (the whole host, all network namespaces, IPv4 and
    IPv6; see `tcpcollide-trace trace --help` for its options)."""
    remember_given(ctx)
    if ctx.invoked_subcommand is None:
        with trace.make_context("trace", [], parent=ctx) as sub:
            sub.meta.update(ctx.meta)
            trace.invoke(sub)


for command in (trace, demo, doctor, inventory_cmd, replay_cmd, top):
    main.add_command(command)
