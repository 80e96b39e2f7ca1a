"""`tcpcollide-trace top`: a live dashboard."""

from __future__ import annotations

import click

from tracer.cli.live import run, session_options
from tracer.cli.options import FILTERS, LOADING, WORKLOAD_FILTERS, Command, examples, takes
from tracer.output.dashboard import Dashboard

EXAMPLES = examples(
    ("tcpcollide-trace top", "the whole host, until Ctrl-C"),
    ("tcpcollide-trace top -p 8080", "only collisions on port 8080"),
    ("tcpcollide-trace top --duration 600 --record top.rec", "ten minutes, recorded for a replay"),
)


@click.command("top", cls=Command, epilog=EXAMPLES)
@takes(*FILTERS, *WORKLOAD_FILTERS, "duration", "count", *LOADING, "incident_timeout", "record", "metrics", "web_config", "no_color")
def top(no_color, **params):
    """A live dashboard: collisions as they complete, counters by outcome,
    server port, culprit process and client, CLOSE_WAIT sockets and ghosts
    per listener, events per second, lost events and the backend.

    Redraws in place (80x24 is enough); plain lines when stdout is not a
    terminal. No --json: for JSON lines, use `tcpcollide-trace trace --json`.
    Ctrl-C to stop."""
    from rich.console import Console  # noqa: PLC0415

    console = Console(highlight=False, markup=False, emoji=False, no_color=no_color or None)
    dash = Dashboard(console)

    def on_idle(session):
        dash.tick(session.correlator.events_seen, session.correlator.lost_events)
        return None

    try:
        run(session_options(params), dash.write, dash.start, on_idle)
    finally:
        dash.stop()
