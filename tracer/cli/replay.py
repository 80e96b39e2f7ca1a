"""`tcpcollide-trace replay FILE`: a recording's reports again, without root or BPF."""

from __future__ import annotations

import click

from tracer.cli.options import Command, examples, fail, takes, writer
from tracer.pipeline.replay import ReplayError, replay

EXAMPLES = examples(
    ("tcpcollide-trace replay run.rec", "the reports of the run recorded with --record run.rec"),
    ("tcpcollide-trace replay run.rec -v --json", "as JSON lines, with the raw kernel events"),
    ("tcpcollide-trace replay run.rec --all-events", "every recorded kernel event too"),
)


@click.command("replay", cls=Command, epilog=EXAMPLES)
@click.argument("recording", type=click.Path(dir_okay=False))
@takes("as_json", "verbose", "all_events", "no_color")
def replay_cmd(recording, as_json, verbose, all_events, no_color):
    """Replay a recording made with --record: the same reports, without root or BPF.

    The recorded events go through the same pipeline as they did live, with
    the host context recorded for each incident. A damaged recording is
    replayed up to the damage, then the error names its byte offset (exit
    status 1)."""
    try:
        replay(recording, writer(as_json, no_color).write, verbose, all_events)
    except ReplayError as e:
        fail(str(e))
