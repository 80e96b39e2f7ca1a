"""`tcpcollide-trace replay FILE...`: a recording's reports again, without root
or BPF; several recordings (one per host) joined into one."""

from __future__ import annotations

import click

from tracer.cli.options import FILTERS, Command, examples, fail, filters, takes, writer
from tracer.pipeline.replay import ReplayError, replay

EXAMPLES = examples(
    ("tcpcollide-trace replay run.rec", "the reports of the run recorded with --record run.rec"),
    ("tcpcollide-trace replay run.rec -v --json", "as JSON lines, with the raw kernel events"),
    ("tcpcollide-trace replay run.rec --all-events", "every recorded kernel event too"),
    ("tcpcollide-trace replay run.rec -p 12345 -4", "only IPv4 collisions where either end uses port 12345"),
    ("tcpcollide-trace replay client.rec server.rec", "two hosts' recordings joined: both ends of each collision"),
)


@click.command("replay", cls=Command, epilog=EXAMPLES)
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="RECORDING...")
@takes("as_json", "verbose", "all_events", *FILTERS, "no_color")
def replay_cmd(recordings, as_json, verbose, all_events, no_color, **filter_options):
    """Replay a recording made with --record: the same reports, without root or BPF.

    The recorded events go through the same pipeline as they did live, with
    the host context recorded for each incident. The filters apply to the
    recorded events as the kernel applies them live (the kernel's counts are
    then not compared: they are of the whole recording). A damaged recording
    is replayed up to the damage, then the error names its byte offset (exit
    status 1).

    Several recordings, made by tracers on the hosts at the two ends of the
    same connections, are joined: each collision seen at both ends is one
    report (view "both") with the client's and the server's evidence. The
    recordings' clocks are aligned on those collisions (the challenge ACK's
    exchange, as NTP aligns clocks), or share the kernel's clock when they are
    of one boot; each report and the summary say the shift applied."""
    try:
        replay(list(recordings), writer(as_json, no_color).write, verbose, all_events, filters(**filter_options))
    except ReplayError as e:
        fail(str(e))
