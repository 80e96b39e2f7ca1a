"""Running a tracing session from a subcommand: its options, start, stream, detach."""

from __future__ import annotations

from tracer.cli.options import RUNTIME_ERRORS, fail, filters
from tracer.session import Options, Session, Stop


def session_options(params: dict, **overrides) -> Options:
    """Options for a session from a subcommand's parameters (those it takes)."""
    settings = dict(
        filters=filters(**params),
        backend=params.get("backend", "auto"), btf=params.get("btf"), kernel_types=params.get("kernel_types", "auto"),
        selftest=not params.get("no_selftest", False), state_hook=params.get("state_hook", "lazy"),
        duration=params.get("duration"), count=params.get("count"), verbose=params.get("verbose", False),
        all_events=params.get("all_events", False), record=params.get("record"), metrics=params.get("metrics"),
    )
    if params.get("incident_timeout") is not None:
        settings["incident_timeout"] = params["incident_timeout"]
    settings.update(overrides)
    return Options(**settings)


def run(options: Options, sink, on_ready=None, on_idle=None, flush=None) -> dict | None:
    """Start, stream, detach. None when a signal came before `ready`.
    flush: called after each batch of records (a sink that buffers them)."""
    session = Session(options, sink, flush)
    with session.signals():
        try:
            session.start()
            if on_ready is not None:
                on_ready()
            return session.run(on_idle)
        except Stop as e:  # a signal between the steps above
            return session.finish(str(e)) if session.ready else None
        except RUNTIME_ERRORS as e:
            fail(str(e))
        finally:
            session.close()
            if flush is not None:
                flush()
