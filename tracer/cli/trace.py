"""`tcpcollide-trace trace`: trace the host and report each collision (the default command)."""

from __future__ import annotations

import click

from tracer.cli.live import live_output, run, session_options
from tracer.cli.options import FILTERS, LOADING, WORKLOAD_FILTERS, Command, examples, takes

TRACE_OPTIONS = (*FILTERS, *WORKLOAD_FILTERS, "duration", "count", "as_json", "verbose", "all_events", *LOADING, "incident_timeout",
                 "record", "metrics", "web_config", "journal", "no_color")

EXAMPLES = examples(
    ("tcpcollide-trace trace", "trace the whole host until Ctrl-C (also: tcpcollide-trace)"),
    ("tcpcollide-trace trace -p 8080 --json", "collisions on port 8080, as JSON lines"),
    ("tcpcollide-trace trace --netns 4026532177 -4 -c 1", "the first IPv4 collision in one network namespace"),
    ("tcpcollide-trace trace --duration 60 --record run.rec", "trace for a minute, keep what the kernel said"),
    ("tcpcollide-trace trace -v --all-events --json", "for kernel research: every raw event too"),
    ("tcpcollide-trace trace --metrics 0.0.0.0:9465", "serve Prometheus metrics while tracing"),
    ("tcpcollide-trace trace --pod shop/cart-7d4b9 --json", "collisions of one Kubernetes pod"),
    ("tcpcollide-trace trace --container leaky --unit nginx", "collisions of a container, and of a systemd unit"),
    ("tcpcollide-trace trace --journal --duration 5", "collisions as journal entries (journalctl TCPCOLLIDE_TYPE=collision)"),
)


@click.command("trace", cls=Command, epilog=EXAMPLES)
@takes(*TRACE_OPTIONS)
def trace(as_json, no_color, journal, **params):
    """Trace the host: report each connection whose SYN hits a socket left in CLOSE_WAIT.

    Every network namespace, IPv4 and IPv6, until Ctrl-C, --duration or
    --count, unless filtered (-p, --netns, -4, -6: applied in the kernel;
    --container, --pod, --unit: the network namespaces their processes run
    in, kept current, applied in the kernel, and in a namespace shared with
    other workloads only the collisions whose processes are theirs).
    Each collision is reported as it completes: both ends, the lingering
    socket and the process that leaked it, a timeline (SYN, challenge ACK,
    RST, the retried SYN, the new connection), the penalty the client paid,
    and what to fix. A summary follows at exit."""
    out, stream = live_output(as_json, no_color, batched=True, journal=journal)
    run(session_options(params), out.write, flush=out.flush, stream=stream)
