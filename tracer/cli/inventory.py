"""`tcpcollide-trace inventory`: who holds CLOSE_WAIT sockets here, without BPF."""

from __future__ import annotations

import click

from tracer.cli.options import FILTERS, Command, examples, fail, filters, takes, writer
from tracer.host import inventory, sockdiag
from tracer.kernel import capabilities

EXAMPLES = examples(
    ("tcpcollide-trace inventory", "every CLOSE_WAIT socket and every listener with ghosts, all namespaces"),
    ("tcpcollide-trace inventory -p 8080 --json", "only port 8080, as one JSON line"),
    ("tcpcollide-trace inventory --netns 4026532177 -6", "one network namespace, IPv6 only"),
)


@click.command("inventory", cls=Command, epilog=EXAMPLES)
@takes(*FILTERS, "as_json", "no_color")
def inventory_cmd(as_json, no_color, **params):
    """Who is leaking sockets here, without waiting for a collision.

    A snapshot of every network namespace: the CLOSE_WAIT sockets grouped by
    the process holding them and their local port, with their ages (since
    each last received an ACK) and unread bytes, and the listeners whose
    accept queue holds dead children (ghosts) or is full. Uses sock_diag and
    /proc, no BPF; root sees every namespace and process."""
    wanted = filters(**params)
    try:
        capabilities.require_root("to see every namespace and process")
        rep = inventory.snapshot(wanted.port, wanted.netns, wanted.family)
    except (capabilities.KernelError, sockdiag.SockDiagError, OSError) as e:
        fail(str(e))
    writer(as_json, no_color).write(rep)
