"""`tcpcollide-trace replay FILE...`: a recording's reports again, without root
or BPF; several recordings (one per host) joined into one."""

from __future__ import annotations

import functools

import click

from tracer.cli.options import FILTERS, Command, examples, fail, filters, option, takes, writer
from tracer.host import workload
from tracer.pipeline.join import replay_recordings
from tracer.pipeline.replay import ReplayError

EXAMPLES = examples(
    ("tcpcollide-trace replay run.rec", "the reports of the run recorded with --record run.rec"),
    ("tcpcollide-trace replay run.rec -v --json", "as JSON lines, with the raw kernel events"),
    ("tcpcollide-trace replay run.rec --all-events", "every recorded kernel event too"),
    ("tcpcollide-trace replay run.rec -p 12345 -4", "only IPv4 collisions where either end uses port 12345"),
    ("tcpcollide-trace replay client.rec server.rec", "two hosts' recordings joined: both ends of each collision"),
)


@click.command("replay", cls=Command, epilog=EXAMPLES)
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="RECORDING...")
@takes("as_json", "verbose", "all_events", *FILTERS)
@option("container", help="Only collisions whose recorded processes (the socket's holder, the listener's, the "
                          "connecting process) run in this container (name, or id / a prefix of 12+ hex digits). "
                          "Repeat for more.")
@option("pod", help="Only collisions whose recorded processes run in this Kubernetes pod (NAMESPACE/NAME or its "
                    "UID). Repeat for more.")
@option("unit", help="Only collisions whose recorded processes run in this systemd unit or slice. Repeat for more.")
@takes("no_color")
def replay_cmd(recordings, as_json, verbose, all_events, no_color, **filter_options):
    """Replay a recording made with --record: the same reports, without root or BPF.

    The recorded events go through the same pipeline as they did live, with
    the host context recorded for each incident. The filters apply to the
    recorded events as the kernel applies them live (the kernel's counts are
    then not compared: they are of the whole recording); the workload filters
    keep the collisions whose recorded processes (the socket's holder, the
    listener's, the connecting process) belong to the workload, and count the
    others in the summary (a recording keeps no namespace's workloads). A damaged recording
    is replayed up to the damage, then the error names its byte offset (exit
    status 1).

    Several recordings, made by tracers on the hosts at the two ends of the
    same connections, are joined: each collision seen at both ends is one
    report (view "both") with the client's and the server's evidence. The
    recordings' clocks are aligned on those collisions (the challenge ACK's
    exchange, as NTP aligns clocks), or share the kernel's clock when they are
    of one boot; each report and the summary say the shift applied."""
    chosen = filters(**filter_options)
    select = None
    if chosen.workloads:
        selection = workload.Selection([workload.Selector(kind, value) for kind, value in chosen.workloads])
        select = functools.partial(selection.outside, [])  # by the processes named: no namespace is known
    try:
        replay_recordings(list(recordings), writer(as_json, no_color).write, verbose, all_events, chosen, select)
    except ReplayError as e:
        fail(str(e))
