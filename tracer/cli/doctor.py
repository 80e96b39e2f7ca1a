"""`tcpcollide-trace doctor`: can the tracer work here, and with which hooks?"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from tracer import __version__
from tracer.cli.options import RUNTIME_ERRORS, Command, examples, takes, writer
from tracer import selftest
from tracer.host import conntrack
from tracer.kernel import capabilities, hooks, program
from tracer.session import Options, Stages, attach

EXAMPLES = examples(
    ("tcpcollide-trace doctor", "what this kernel offers, and the hooks the tracer would use"),
    ("tcpcollide-trace doctor --selftest --json", "also prove that each hook fires, as one JSON line"),
    ("tcpcollide-trace doctor --backend kprobe", "could the kprobe backend serve this kernel?"),
)


def diagnose(backend: str, run_selftest: bool, btf_path: str | None, types_source: str = "auto") -> dict:
    """What this kernel offers and what the tracer would do with it."""
    problems: list[str] = []
    stages = Stages()
    rep: dict = {"type": "doctor", "version": __version__, "kernel": capabilities.release(), "root": os.geteuid() == 0}
    rep["bcc"] = capabilities.bcc_version()
    if rep["bcc"] is None:
        problems.append("bcc is not importable: install python3-bpfcc (scripts/setup does)")
    try:
        rep["tracefs"] = str(capabilities.tracefs(mount=rep["root"]))
    except capabilities.KernelError as e:
        rep["tracefs"] = None
        problems.append(str(e))
    rep["btf"] = btf_path or (str(capabilities.SYSFS_BTF) if capabilities.SYSFS_BTF.exists() else None)
    rep["headers"] = str(capabilities.headers_dir()) if capabilities.headers_dir() else None
    rep["lockdown"] = capabilities.lockdown()
    rep["kprobes"] = capabilities.kprobes_available(rep["tracefs"] and Path(rep["tracefs"]))
    # a translated connection's conntrack entry (tracer/host/conntrack.py); not a problem when missing
    problem = conntrack.probe() if rep["root"] else "not asked (needs root)"
    rep["conntrack"] = {"visible": problem is None if rep["root"] else None, "problem": problem}
    stages.done("checks")
    types = None
    try:
        types = program.kernel_types(btf_path, types_source)
        rep["types"] = types.source
    except program.BuildError as e:
        rep["types"] = None
        problems.append(str(e))
    probe = None
    if types is not None and types.btf is not None and rep["root"] and rep["bcc"]:
        probe = lambda: program.fentry_probe(types)  # noqa: E731
    stages.done("kernel_types")
    offer = hooks.gather(types.btf if types else None, probe)
    if types is not None:
        types.save()
    stages.done("hooks")
    rep["fentry"] = offer.fentry if probe else None
    rep["fentry_note"] = offer.fentry_note if probe else "not probed (needs root, bcc and BTF)"
    plan = None
    if run_selftest and not problems:
        if not rep["root"]:
            problems.append("--selftest needs root")
        else:
            try:
                loading = Stages()
                plan, _, bpf = attach(Options(backend=backend, btf=btf_path, selftest=True, kernel_types=types_source),
                                      loading)
                bpf.cleanup()
                # its own kernel_types and hooks repeat the ones above
                stages.took.update({k: v for k, v in loading.took.items()
                                    if k in ("compile_load", "load_cached", "selftest")})
                rep["object_cache"] = loading.object_cache.as_dict() if loading.object_cache else None
            except RUNTIME_ERRORS + (selftest.SelftestError,) as e:
                problems.append(str(e))
    if plan is None:
        try:
            plan = hooks.select(offer, backend)
        except hooks.BackendError as e:
            problems.append(str(e))
    rep["backend"] = plan.backend if plan else None
    rep["hooks"] = [c.as_dict() for c in plan.choices] if plan else []
    if not rep["root"]:
        problems.append("not root: the tracer itself must run as root")
    else:
        rep["capabilities"] = {"effective": sorted(capabilities.effective_capabilities()),
                               "missing": capabilities.missing_capabilities()}
        problems += [f"without {m['capability']}: {m['cost']}" for m in rep["capabilities"]["missing"] if m["fatal"]]
    rep["stages_s"] = stages.took
    rep["problems"] = list(dict.fromkeys(problems))
    rep["ok"] = not problems
    return rep


@click.command("doctor", cls=Command, epilog=EXAMPLES)
@click.option("--selftest", "run_selftest", is_flag=True,
              help="Also load the programs and prove each hook fires (a harmless collision in a private namespace).")
@takes("backend", "btf", "kernel_types", "as_json", "no_color")
def doctor(run_selftest, backend, btf, kernel_types, as_json, no_color):
    """Can the tracer work here, and with which hooks?

    Kernel, BTF and header sources, lockdown, kprobe/fentry/tracepoint
    availability, bcc, and for each logical hook the backend chosen (and with
    --selftest whether it was seen to fire). Exit status 1 when the tracer
    cannot work here, with the reasons."""
    rep = diagnose(backend, run_selftest, btf, kernel_types)
    writer(as_json, no_color).write(rep)
    if not rep["ok"]:
        sys.exit(1)
