"""Unit tests for the command line (tracer.cli, through click's CliRunner) and
for making untrusted text inert in the readable output (tracer.render).

No root, no BPF: usage errors stop before anything is loaded, and the
"not root" test fakes a non-root euid (with guards that fail the test rather
than load anything should the check ever be passed).

Synthetic data only: the collision records rendered here come from a synthetic
incident (tests/synthetic.py) with hostile text injected into its fields.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from click.testing import CliRunner

from tests.synthetic import HZ, STATES, Collision
from tracer import cli, session
from tracer.kernel import capabilities
from tracer.pipeline.correlator import Correlator
from tracer.output.render import JsonWriter, TextWriter, inert
from tracer.pipeline.records import Clock, collision_record

PROG = "tcpcollide-trace"


@pytest.fixture(autouse=True)
def never_trace(monkeypatch):
    """These tests may run as root: should a command ever get past its checks,
    fail fast instead of loading BPF programs and tracing until killed."""

    def must_not_run(*a, **kw):
        raise AssertionError("a unit test got past the checks into a real trace")

    monkeypatch.setattr(session.hooks, "select", must_not_run)
    monkeypatch.setattr(session.program, "load", must_not_run)
    monkeypatch.setattr(cli.netns, "NetNS", must_not_run)


def invoke(args: list[str]):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps stderr apart
    return runner.invoke(cli.main, args, prog_name=PROG)


def stderr_of(result) -> str:
    try:
        return result.stderr
    except ValueError:  # stderr mixed into output
        return result.output


# -- help -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_examples(flag):
    result = invoke([flag])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert "tcpcollide-trace -p 8080 --json" in result.output
    assert "tcpcollide-trace demo" in result.output
    trace_help = invoke(["trace", flag]).output
    for option in ("--port", "--netns", "--duration", "--count", "--json", "--backend", "--btf"):
        assert option in trace_help


def test_demo_help_shows_examples():
    result = invoke(["demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert "tcpcollide-trace demo -6 --json" in result.output
    assert "--timeout" in result.output


def test_inventory_help_shows_examples():
    result = invoke(["inventory", "--help"])
    assert result.exit_code == 0, result.output
    assert "tcpcollide-trace inventory -p 8080 --json" in result.output
    assert "inventory" in invoke(["--help"]).output


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"{PROG}, version ")


# -- usage errors ------------------------------------------------------------------------

BAD_USAGE = {
    "port-zero": (["-p", "0"], "--port"),
    "port-too-big": (["-p", "70000"], "--port"),
    "port-not-a-number": (["-p", "abc"], "--port"),
    "netns-negative": (["--netns", "-1"], "--netns"),
    "netns-zero": (["--netns", "0"], "--netns"),
    "duration-zero": (["--duration", "0"], "--duration"),
    "duration-negative": (["--duration", "-5"], "--duration"),
    "count-zero": (["-c", "0"], "--count"),
    "ipv4-and-ipv6": (["-4", "-6"], "-4 and -6"),
    "unknown-backend": (["--backend", "bogus"], "--backend"),
    "missing-btf-file": (["--btf", "/nonexistent"], "--btf"),
    "incident-timeout-zero": (["--incident-timeout", "0"], "--incident-timeout"),
    "demo-ipv4-and-ipv6": (["demo", "-4", "-6"], "-4 and -6"),
    "demo-timeout-zero": (["demo", "--timeout", "0"], "--timeout"),
    "unknown-option": (["--bogus"], "--bogus"),
    "metrics-no-port": (["--metrics", "localhost"], "--metrics"),
    "metrics-port-too-big": (["--metrics", "0.0.0.0:70000"], "--metrics"),
    "replay-no-file": (["replay"], "RECORDING"),
    "pod-without-namespace": (["trace", "--pod", "cart"], "--pod"),
    "container-with-a-newline": (["trace", "--container", "a\nb"], "--container"),
}


@pytest.mark.parametrize("args,mentions", BAD_USAGE.values(), ids=BAD_USAGE.keys())
def test_bad_usage_exits_2_with_one_error_line(args, mentions):
    result = invoke(args)
    err = stderr_of(result)
    assert result.exit_code == 2, (result.output, err)
    assert isinstance(result.exception, SystemExit) and result.exception.code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert mentions in errors[0]
    assert err.splitlines()[0].startswith(f"Usage: {PROG}")
    assert len(err.splitlines()) <= 5
    assert "Traceback" not in err and "Traceback" not in result.output


# -- options after their subcommand, and before it (0.4's form) ---------------------------

MISPLACED = {
    "json-before-top": (["--json", "top"], "option --json does not apply to 'top'"),
    "json-after-top": (["top", "--json"], "--json"),
    "record-before-inventory": (["--record", "x.rec", "inventory"], "option --record does not apply to 'inventory'"),
    "count-before-demo": (["-c", "1", "demo"], "option -c/--count does not apply to 'demo'"),
    "duration-before-demo": (["--duration", "1", "demo"], "option --duration does not apply to 'demo'"),
    "port-before-and-after": (["-p", "80", "inventory", "-p", "81"], "given before 'inventory' as 80 and after it as 81"),
    "family-before-and-after": (["-6", "demo", "-4"], "-4 and -6"),
    "json-before-doctor-and-verbose": (["-v", "doctor"], "option -v/--verbose does not apply to 'doctor'"),
    "unit-for-demo": (["demo", "--unit", "nginx"], "--unit"),
    "pod-before-inventory": (["--pod", "shop/cart", "inventory"], "option --pod does not apply to 'inventory'"),
}


@pytest.mark.parametrize("args,mentions", MISPLACED.values(), ids=MISPLACED.keys())
def test_an_option_that_does_not_apply_is_a_usage_error(args, mentions):
    result = invoke(args)
    err = stderr_of(result)
    assert result.exit_code == 2, (result.output, err)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and mentions in errors[0], err


@pytest.mark.parametrize("args", [["doctor", "--json", "--help"], ["inventory", "-p", "8080", "--json", "--help"],
                                  ["replay", "x.rec", "-v", "--json", "--help"], ["top", "-p", "8080", "--help"],
                                  ["demo", "-6", "--json", "--help"], ["trace", "-p", "8080", "--json", "--help"],
                                  ["trace", "--container", "leaky", "--pod", "shop/cart", "--unit", "nginx", "--help"],
                                  ["top", "--unit", "nginx", "--help"]])
def test_every_subcommand_takes_its_options_after_its_name(args):
    result = invoke(args)
    assert result.exit_code == 0, stderr_of(result)


# -- not root ---------------------------------------------------------------------------


@pytest.fixture
def not_root(monkeypatch):
    """euid 1000 as tracer.kernel.capabilities sees it."""
    monkeypatch.setattr(capabilities.os, "geteuid", lambda: 1000)


@pytest.mark.parametrize("args", [[], ["--json"], ["-p", "8080", "--duration", "1"], ["demo"], ["inventory"],
                                  ["--json", "inventory"]])
def test_not_root_exits_1_with_one_error_line(not_root, args):
    result = invoke(args)
    err = stderr_of(result)
    assert result.exit_code == 1, (result.output, err, result.exception)
    assert isinstance(result.exception, SystemExit) and result.exception.code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"{PROG}: error: .*\broot\b.*", lines[0])
    assert "Traceback" not in err and "Traceback" not in result.output
    if "--json" in args:
        assert result.stdout == ""  # no half-written JSON stream


def test_runtime_error_text_is_inert(monkeypatch):
    def hostile():
        raise capabilities.KernelError("cannot read /sys/x\x1b[2J\x07: [bold]no[/]")

    monkeypatch.setattr(capabilities, "require_root", hostile)
    result = invoke([])
    err = stderr_of(result)
    assert result.exit_code == 1
    assert "\x1b" not in err and "\x07" not in err
    assert err == f"{PROG}: error: cannot read /sys/x\\x1b[2J\\x07: [bold]no[/]\n"


# -- inert text ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw,shown", [
    ("\x1b[31mred", "\\x1b[31mred"),
    ("a\x9b2Jb", "a\\x9b2Jb"),  # 8-bit CSI
    ("\x00\x07\x08\t\n\r\x7f", "\\x00\\x07\\x08\\x09\\x0a\\x0d\\x7f"),
    ("[bold red]x[/]", "[bold red]x[/]"),  # markup is not a control character: left as text
    ("ksoftirqd/0 é ✓", "ksoftirqd/0 é ✓"),
    (42, "42"),
])
def test_inert(raw, shown):
    assert inert(raw) == shown


HOSTILE = "\x1b[31m[bold red]x[/]\x9b2J"


def hostile_record() -> dict:
    """A real collision record (synthetic incident) with hostile text in the fields
    that carry free text: step details, the explanation, the raw events."""
    col = Collision()
    c = Correlator(STATES, HZ)
    out = []
    for ev in col.seed_sequence():
        out += c.feed(ev)
    [inc] = out
    rec = collision_record(inc, Clock(0), "tracepoint", verbose=True)
    rec["steps"][0]["comm"] = HOSTILE
    rec["steps"][2]["note"] = HOSTILE
    rec["explanation"] = HOSTILE + " " + rec["explanation"]
    rec["events"][0]["comm"] = HOSTILE
    return rec


@pytest.mark.parametrize("color", [False, True])
def test_text_writer_prints_hostile_fields_inert(color):
    buf = io.StringIO()
    TextWriter(buf, color=color, width=400).write(hostile_record())
    out = buf.getvalue()
    assert "\x9b" not in out
    assert "\x1b[31m[bold red]" not in out  # the hostile escape never reaches the terminal raw
    if not color:
        assert "\x1b" not in out  # no styles at all: any ESC would be the hostile one
    assert "\\x1b[31m[bold red]x[/]\\x9b2J" in out  # shown as text, markup not interpreted
    assert out.count("[bold red]x[/]") >= 3  # step detail, explanation (and the JSON event line)
    assert "collision #1: 127.0.0.1:39836 -> 127.0.0.1:12345" in out


def test_json_writer_line_is_inert_and_lossless():
    rec = hostile_record()
    buf = io.StringIO()
    JsonWriter(buf).write(rec)
    line = buf.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert "\x1b" not in line and "\x9b" not in line
    assert json.loads(line) == rec


def test_inventory_and_queue_text_is_inert():
    """Process names in the inventory and the queue record are shown inert."""
    inv = {"type": "inventory", "time": "t", "namespaces": 1, "closewait_total": 1, "listeners_total": 1,
           "age_source": "x", "listeners": [{"netns": 1, "listener": "127.0.0.1:80", "recv_q": 2, "limit": 1,
                                              "alive": 1, "ghosts": 1, "full": True}],
           "closewait": [{"pid": 7, "comm": HOSTILE, "netns": 1, "local": "127.0.0.1:80", "count": 1,
                          "oldest_age_s": 1.0, "newest_age_s": 1.0, "unread_bytes": 0,
                          "sockets": [{"remote": "r", "inode": 1, "fd": 3, "age_s": 1.0, "unread_bytes": 0}]}]}
    queue = {"type": "queue", "event": "overflow", "netns": 1, "explanation": HOSTILE}
    buf = io.StringIO()
    w = TextWriter(buf, color=True, width=400)
    w.write(inv)
    w.write(queue)
    out = buf.getvalue()
    assert "\x9b" not in out and "\x1b[31m[bold red]" not in out
    assert out.count("[bold red]x[/]") == 2
    assert "FULL" in out


def test_owner_name_in_the_collision_panel_is_inert():
    rec = hostile_record()
    rec["closewait_socket"]["owners"] = [{"pid": 7, "comm": HOSTILE, "fd": 4}]
    buf = io.StringIO()
    TextWriter(buf, color=True, width=400).write(rec)
    out = buf.getvalue()
    assert "held by: \\x1b[31m[bold red]x[/]\\x9b2J (pid 7) fd 4" in out
    assert "\x9b" not in out


def collision_text(rec: dict) -> str:
    buf = io.StringIO()
    TextWriter(buf, color=False, width=400).write(rec)
    return buf.getvalue()


@pytest.mark.parametrize("value, shown", [(True, "in_window=yes"), (False, "in_window=no"),
                                          (None, "in_window=unknown")])
def test_step_detail_shows_booleans_as_yes_no(value, shown):
    """The readable report's step detail says yes/no (unknown for None), never
    Python's True/False/None (synthetic incident; the RST's in_window set)."""
    rec = hostile_record()
    rst = next(s for s in rec["steps"] if s["step"] == "rst")
    rst["in_window"] = value
    rst["seen_at"] = "client"
    out = collision_text(rec)
    assert f"{shown}, seen_at=client" in out, out
    assert not re.search(r"=(True|False|None)\b", out), out


def test_collision_report_shows_no_python_reprs():
    """Every boolean a seed collision's steps carry (the RST's in_window, a
    retry's challenge_ack_sent) reads yes/no in the readable report."""
    rec = hostile_record()
    next(s for s in rec["steps"] if s["step"] == "retry_syn")["challenge_ack_sent"] = False
    out = collision_text(rec)
    assert "in_window=yes" in out and "challenge_ack_sent=no" in out, out
    assert not re.search(r"\b(True|False|None)\b", out), out


@pytest.mark.parametrize("text, parsed", [("0.0.0.0:9465", ("0.0.0.0", 9465)), ("[::]:9465", ("::", 9465)),
                                          (":9465", ("0.0.0.0", 9465)), ("127.0.0.1:1", ("127.0.0.1", 1))])
def test_metrics_listen_address(text, parsed):
    from tracer.output.metrics import parse_listen
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("command", ["demo", "doctor", "inventory", "top", "replay"])
def test_every_subcommand_has_help_with_examples(command):
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and f"tcpcollide-trace {command}" in result.output.replace("--json ", "")


def test_help_documents_exit_codes_and_completion():
    out = invoke(["--help"]).output
    assert "Exit status: 0" in out and "2 bad usage" in out
    assert "_TCPCOLLIDE_TRACE_COMPLETE=bash_source" in out


@pytest.mark.parametrize("skipped, warned", [(0, False), (None, False), (3, True)])
def test_text_summary_warns_of_skipped_bpf_runs(skipped, warned):
    """A summary record (synthetic) with skipped BPF runs ends with a warning
    naming them; none when the kernel counted none or does not count them."""
    from tracer.pipeline.records import Summary

    buf = io.StringIO()
    TextWriter(buf, color=False, width=400).write(Summary().record(10, 0, "SIGINT", 0, skipped))
    assert ("the kernel skipped 3 run(s)" in buf.getvalue()) is warned, buf.getvalue()


def test_readable_ready_line_marks_the_lazy_state_hook():
    """A synthetic ready record, rendered: the hook attached only during
    collisions says so; the others do not."""
    hook = {"logical": "set_state", "target": "sock:inet_sock_set_state", "available": True, "lazy": True,
            "note": ""}
    other = {"logical": "send_reset", "target": "tcp:tcp_send_reset", "available": True, "lazy": False, "note": ""}
    out = io.StringIO()
    TextWriter(out, color=False, width=200).write({
        "type": "ready", "version": "0.4.0", "startup_s": 0.5, "kernel": "6.18", "backend": "tracepoint",
        "types": "btf", "hooks": [hook, other]})
    text = out.getvalue()
    assert "set_state=sock:inet_sock_set_state (during collisions)" in text
    assert "send_reset=tcp:tcp_send_reset" in text and text.count("(during collisions)") == 1
