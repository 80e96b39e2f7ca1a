"""Live: every example in every `--help` epilog, run for real.

The examples are read from the help text the command prints (the group's and
each subcommand's, rendered in-process by click exactly as `--help` renders
it), so an example added, changed or removed there is run here without
editing this file. Each runs as root with the real binary, made finite and
harmless:

- inside a network namespace this module makes (`ip netns exec`), so metrics
  ports and inventories are private;
- bounded: `--duration` set to a few seconds where the subcommand takes it
  (trace, top, and the group's own examples, which run trace); the others
  (demo, doctor, inventory, replay) end by themselves;
- in a fresh directory per example, holding a copy of `run.rec` (a recording
  of the demo's collision, made once by the real tracer) for the replay
  examples, and under each other `.rec` name a replay example gives (a join's
  recordings); the files the examples record (run.rec, demo.rec, top.rec) land
  there too.

`top` with stdout not a terminal prints plain lines (no redraw), and ends
with --duration like trace, so it runs with pipes like the others.

An example fails when it exits non-zero (2: a usage error, the usual way an
example goes stale), prints a Python traceback, writes a JSON example's
stdout that is not JSON lines, or does not write the file it says it records.
Two exits 1 are answers, not failures: doctor asked about a forced backend
this kernel cannot serve (`doctor --backend kprobe` on a kernel without
kprobes) says so, with its reasons, and exits 1 as documented; and a
workload filter naming a workload that does not run on this machine
(`--pod shop/cart-7d4b9`) says so in its one error line (the filters are run
for real in test_workload_live.py, on workloads that tests make).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess

import click
import pytest

from tests.live import BIN, SLOW, ns_name, require_live
from tests.test_systemd import parse_entry
from tracer import cli
from tracer.host import netns

PROG = "tcpcollide-trace"
BOUND_S = "1"  # --duration for the examples that would otherwise trace until Ctrl-C
TIMEOUT_S = 60 * SLOW  # per example: a bounded example that is still running by then hangs
RECORDING = "run.rec"  # the recording the replay examples name


def _context(command: click.Command, parent: click.Context | None = None) -> click.Context:
    # with the command's own settings (-h as well as --help): click keeps the
    # help option it builds for a context on the command, for later runs too
    name = PROG if parent is None else command.name
    return click.Context(command, info_name=name, parent=parent, **command.context_settings)


def _help(command: click.Command, parent: click.Context | None = None) -> str:
    return command.get_help(_context(command, parent))


def examples_in(help_text: str) -> list[str]:
    """The commands of the Examples block of one help text (`examples()` in
    tracer/cli/options.py: each line a command, two spaces or more, what it
    does)."""
    found, inside = [], False
    for line in help_text.splitlines():
        if line.strip() == "Examples:":
            inside = True
        elif inside:
            if not line.strip():
                break
            found.append(re.split(r"\s{2,}", line.strip(), maxsplit=1)[0])
    return found


def collect() -> dict[str, list[str]]:
    """{"" (the group) or subcommand name: its help's example commands}."""
    root = _context(cli.main)
    found = {"": examples_in(_help(cli.main))}
    for name, command in sorted(cli.main.commands.items()):
        found[name] = examples_in(_help(command, root))
    return found


# each once (the group's help repeats some of its subcommands' examples), in help order
EXAMPLES = list(dict.fromkeys(example for commands in collect().values() for example in commands))


def subcommand(argv: list[str]) -> click.Command:
    """The subcommand an example runs (trace when it names none)."""
    for word in argv[1:]:
        if word in cli.main.commands:
            return cli.main.commands[word]
    return cli.main.commands["trace"]


def bounded(argv: list[str]) -> list[str]:
    """The example, with --duration set to BOUND_S where its subcommand takes it."""
    if "duration" not in {p.name for p in subcommand(argv).params}:
        return list(argv)
    if "--duration" in argv:
        i = argv.index("--duration")
        return [*argv[:i + 1], BOUND_S, *argv[i + 2:]]
    return [*argv, "--duration", BOUND_S]


def recorded_file(argv: list[str]) -> str | None:
    return argv[argv.index("--record") + 1] if "--record" in argv else None


def answers_no(argv: list[str], r: subprocess.CompletedProcess) -> bool:
    """doctor with a forced backend asks whether that backend can serve this
    kernel; exit 1 with its reasons on stdout (and nothing on stderr) is the
    documented answer "no" (a kernel without kprobes, say), not a failure.
    With the automatic choice, exit 1 means the tracer cannot work here at all:
    a failure."""
    forced = "--backend" in argv and argv[argv.index("--backend") + 1] != "auto"
    if any(a in argv for a in ("--container", "--pod", "--unit")):
        return r.returncode == 1 and r.stderr.startswith(f"{PROG}: error: no running process belongs to --") \
            and len(r.stderr.splitlines()) == 1
    return (subcommand(argv).name == "doctor" and forced and r.returncode == 1 and not r.stderr
            and "problem: " in r.stdout and r.stdout.rstrip().endswith("the tracer cannot work here"))


# -- unit (no root): the collection itself -------------------------------------------------


def test_every_help_has_examples_to_run():
    """An empty or partial collection would let the live test pass without
    running anything: at least one example per subcommand and for the group,
    each a command line of this program that parses into a known subcommand."""
    found = collect()
    assert set(found) == {"", *cli.main.commands}, found
    for name, commands in found.items():
        assert commands, f"no examples found in the help of {name or PROG!r}"
        for command in commands:
            argv = shlex.split(command)
            assert argv[0] == PROG, command
            if name:
                assert subcommand(argv).name == name, command
    assert set(EXAMPLES) == {c for commands in found.values() for c in commands} and len(EXAMPLES) >= 7
    assert any(recorded_file(shlex.split(c)) == RECORDING for c in EXAMPLES), "no example records run.rec"
    # collecting left the command's help options as they were (-h too): click >= 8.2 keeps the help
    # option it built on the command, whatever context asks next; bookworm's 8.1 builds it per context
    assert "-h" in cli.main.get_help_option(click.Context(cli.main, **cli.main.context_settings)).opts


def test_bounded_sets_the_duration_only_where_it_applies():
    assert bounded([PROG]) == [PROG, "--duration", BOUND_S]
    assert bounded([PROG, "top", "--duration", "600", "--record", "top.rec"]) == [
        PROG, "top", "--duration", BOUND_S, "--record", "top.rec"]
    assert bounded([PROG, "trace", "-c", "1"]) == [PROG, "trace", "-c", "1", "--duration", BOUND_S]
    for unbounded in ([PROG, "demo"], [PROG, "doctor", "--selftest"], [PROG, "replay", "run.rec"],
                      [PROG, "inventory", "-p", "8080"]):
        assert bounded(unbounded) == unbounded


def test_only_doctor_with_a_forced_backend_may_answer_no():
    no = "backend      none\nproblem: this kernel has no kprobes\nthe tracer cannot work here\n"

    def done(rc, stdout, stderr=""):
        return subprocess.CompletedProcess([], rc, stdout, stderr)

    assert answers_no([PROG, "doctor", "--backend", "kprobe"], done(1, no))
    assert not answers_no([PROG, "doctor"], done(1, no))
    assert not answers_no([PROG, "doctor", "--selftest", "--backend", "auto"], done(1, no))
    assert not answers_no([PROG, "doctor", "--backend", "kprobe"], done(1, no, "Traceback (most recent call last)"))
    assert not answers_no([PROG, "doctor", "--backend", "kprobe"], done(1, "kernel 6.18\n"))
    assert not answers_no([PROG, "doctor", "--backend", "kprobe"], done(2, no))
    assert not answers_no([PROG, "trace", "--backend", "kprobe"], done(1, no))


# -- live: each example, run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_ns():
    require_live()
    with netns.NetNS(ns_name("help")) as ns:
        yield ns


def run_in(ns: netns.NetNS, argv: list[str], cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [str(BIN), *argv[1:]]
    try:
        return subprocess.run(["ip", "netns", "exec", ns.name, *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"{shlex.join(argv)} still running after {TIMEOUT_S:.0f} s\nstderr:\n{stderr}")


@pytest.fixture(scope="module")
def recording(example_ns, tmp_path_factory):
    """run.rec, with a collision in it: the demo, recorded by the real tracer."""
    path = tmp_path_factory.mktemp("recording") / RECORDING
    r = run_in(example_ns, [PROG, "demo", "--record", str(path)], path.parent)
    assert r.returncode == 0 and path.stat().st_size > 0, f"could not record {RECORDING}:\n{r.stderr}"
    return path


@pytest.mark.live
@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLES)
def test_help_example_runs(example, example_ns, recording, tmp_path):
    argv = bounded(shlex.split(example))
    written = recorded_file(argv)
    if written != RECORDING:  # for the replay examples; one that records run.rec must write it itself
        shutil.copy(recording, tmp_path / RECORDING)
    for name in argv:  # a join's recordings (client.rec server.rec): copies of it, each a real recording
        if name.endswith(".rec") and name not in (written, RECORDING):
            shutil.copy(recording, tmp_path / name)
    journal = None
    if "--journal" in argv:  # where journald's socket would be: one the test binds
        journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        journal.bind(str(tmp_path / "journal"))
    r = run_in(example_ns, argv, tmp_path, {"TCPCOLLIDE_JOURNAL_SOCKET": str(tmp_path / "journal")} if journal else None)
    shown = f"{shlex.join(argv)} (the help example {example!r})"
    if journal is not None:
        journal.setblocking(False)
        kinds = []
        with contextlib.suppress(BlockingIOError):
            while True:
                kinds.append(parse_entry(journal.recv(1 << 20))["TCPCOLLIDE_TYPE"])
        journal.close()
        assert kinds[:1] == ["ready"] and kinds[-1:] == ["summary"], f"{shown}: journal entries {kinds}"
    output = f"\nstderr:\n{r.stderr}\nstdout (its end):\n{r.stdout[-2000:]}"
    assert r.returncode != 2, f"{shown}: usage error (exit 2){output}"
    assert r.returncode == 0 or answers_no(argv, r), f"{shown}: exit {r.returncode}{output}"
    assert "Traceback (most recent call last)" not in r.stderr, f"{shown}: a Python traceback{output}"
    if r.returncode != 0:
        return  # the documented answer: nothing else to check
    if "--json" in argv:
        lines = r.stdout.splitlines()
        assert lines, f"{shown}: no JSON on stdout{output}"
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                pytest.fail(f"{shown}: a stdout line is not JSON: {line!r}{output}")
    if written:
        path = tmp_path / written
        assert path.is_file() and path.stat().st_size > 0, f"{shown}: did not record {written}{output}"
