"""Running a tracing session from a subcommand: its options, start, stream, detach."""

from __future__ import annotations

import click

from tracer.cli.options import RUNTIME_ERRORS, fail, filters, writer
from tracer.output.stream import OutputClosed, Stdout
from tracer.output.systemd import JournalWriter, Notifier, journal_is_stdout
from tracer.session import Options, Session, Stop


def session_options(params: dict, **overrides) -> Options:
    """Options for a session from a subcommand's parameters (those it takes)."""
    settings = dict(
        filters=filters(**params),
        backend=params.get("backend", "auto"), btf=params.get("btf"), kernel_types=params.get("kernel_types", "auto"),
        selftest=not params.get("no_selftest", False), state_hook=params.get("state_hook", "lazy"),
        duration=params.get("duration"), count=params.get("count"), verbose=params.get("verbose", False),
        all_events=params.get("all_events", False), record=params.get("record"), metrics=params.get("metrics"),
        web_config=params.get("web_config"),
    )
    if settings["web_config"] and not settings["metrics"]:
        raise click.UsageError("--web-config secures the metrics server: give --metrics HOST:PORT too")
    if params.get("incident_timeout") is not None:
        settings["incident_timeout"] = params["incident_timeout"]
    settings.update(overrides)
    return Options(**settings)


def live_output(as_json: bool, no_color: bool, batched: bool = False, journal: bool = False):
    """(writer, stream): a live session's records go to standard output
    through a stream that never blocks the tracing loop (tracer/output/stream.py),
    or to the journal (--journal, or a service whose stdout is the journal)."""
    if journal or journal_is_stdout():
        try:
            return JournalWriter(), None
        except OSError as e:
            fail(e.strerror)
    try:
        stream = Stdout()
    except (OSError, ValueError):  # not a real file (io.UnsupportedOperation: click's test runner)
        return writer(as_json, no_color, batched), None
    return writer(as_json, no_color, batched, out=stream), stream


def run(options: Options, sink, on_ready=None, on_idle=None, flush=None, stream: Stdout | None = None) -> dict | None:
    """Start, stream, detach. None when a signal came before `ready`, or
    when the reader of standard output went away (`| head -1`: the session
    ends as after a signal, without the summary nobody would read).
    flush: called after each batch of records (a sink that buffers them).
    stream: standard output (tracer/output/stream.py): what it dropped for
    a reader that did not read goes in the summary (`output_dropped`)."""
    if stream is not None:
        inner = sink

        def sink(rec: dict) -> None:
            if rec.get("type") == "summary":
                if stream.dropped() is not None:
                    rec["output_dropped"] = stream.dropped()
                stream.keep_next()  # the summary is never dropped
            inner(rec)

    session = Session(options, sink, flush)
    notifier = Notifier()  # a systemd service's readiness and status (tracer/output/systemd.py)
    with session.signals():
        try:
            session.start()
            notifier.ready(session)
            if on_ready is not None:
                on_ready()

            def idle(s):
                notifier.tick(s)
                return on_idle(s) if on_idle is not None else None

            return session.run(idle)
        except Stop as e:  # a signal between the steps above
            return session.finish(str(e)) if session.ready else None
        except OutputClosed:
            return None
        except RUNTIME_ERRORS as e:
            fail(str(e))
        except OSError as e:
            if session.ready:
                raise
            # the host refused something while starting (no descriptor left, ...): everything is detached below
            fail(f"cannot start: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        finally:
            notifier.stopping()
            session.close()
            try:
                if flush is not None:
                    flush()
            except OutputClosed:
                pass
            if stream is not None:
                stream.finish()
