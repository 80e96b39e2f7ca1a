"""Helpers for the live tests: the real `tcpcollide-trace` command as a
subprocess, and the demo's scenario (the write-up's first experiment) in
namespaces the tests create."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "tcpcollide-trace"
# BIN runs this checkout's code, whatever checkout the editable install points
# at (tests run in a git worktree of the project would test another's code)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
# the kernel matrix (scripts/kernel-matrix) runs the live suite once per backend
BACKEND = os.environ.get("TCPCOLLIDE_TEST_BACKEND", "auto")
# the state hook's mode: under full emulation a lazily re-attached hook comes
# back after a client's fast retry (the tracer then keeps it, but the first
# collision is incomplete), so the matrix's guests use "always" (scripts/guest-run)
STATE_HOOK = os.environ.get("TCPCOLLIDE_TEST_STATE_HOOK", "lazy")
# under full emulation (the matrix's QEMU guests) everything is ~10x slower:
# timeouts and timing tolerances scale with this factor (1 on real hardware)
SLOW = float(os.environ.get("TCPCOLLIDE_TEST_SLOW", "1"))


def require_live() -> None:
    """Live tests need root, bcc and tracefs. Off CI they skip without them;
    on CI (CI=true) a missing prerequisite is a failure, never a skip."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("bcc not importable")
    if not shutil.which("ip"):
        problems.append("iproute2 missing")
    if problems:
        msg = "live tests need " + ", ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


_counter = iter(range(10_000))


def ns_name(tag: str) -> str:
    return f"tct-{tag}-{os.getpid()}-{next(_counter)}"


class Tracer:
    """`tcpcollide-trace trace --json ARGS` running in the background. (0.4's
    form, with the options before the subcommand, is run by test_demo_end_to_end
    and the CLI's unit tests.)"""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [str(BIN), "trace", "--json", "--backend", BACKEND, "--state-hook", STATE_HOOK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.records: list[dict] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_record(self, timeout: float) -> dict | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            return None
        rec = json.loads(line)
        self.records.append(rec)
        return rec

    def wait_ready(self, timeout: float = 30) -> dict:
        rec = self.next_record(timeout * SLOW)
        if rec is None or rec.get("type") != "ready":
            self.proc.kill()
            err = self.proc.stderr.read()
            raise AssertionError(f"tracer did not become ready: first record {rec!r}, stderr {err!r}")
        return rec

    def wait_for(self, kind: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.next_record(max(0.01, deadline - time.monotonic()))
            if rec is None:
                return None
            if rec.get("type") == kind:
                return rec
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20 * SLOW) -> tuple[int, list[dict], str]:
        """Signal it, collect every record, return (exit code, records, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        while self.next_record(timeout=5) is not None:
            pass
        return rc, self.records, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


SCHEDULING_MS = 20  # how much later than the kernel a loaded machine may let the client see its connect() return


def agrees_with_connect(penalty_ms: float, connect_ms: float, tolerance_ms: float) -> bool:
    """The tracer's penalty (kernel time stamps) against the client's own
    measurement of its connect(): never more than it (beyond the stamps'
    resolution), and less only by what scheduling can add to a user-space
    measurement on a loaded machine."""
    return connect_ms - (SCHEDULING_MS * SLOW + tolerance_ms) <= penalty_ms <= connect_ms + tolerance_ms


def late_hook(records: list[dict]) -> bool:
    """The tracer says its lazy state hook came back later than half a
    client's retry time at least once (it then keeps it attached), so an
    establishment may have gone unseen: that run's reports are honest but
    not exact, and a test of exact timelines runs its scenario again."""
    hook = records[-1].get("state_hook") if records and records[-1].get("type") == "summary" else None
    return bool(hook and hook.get("kept_attached"))


def scenario(*args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tracer.host.scenario", *args],
        stdout=subprocess.PIPE, stdin=stdin, text=True, cwd=REPO,
    )


def read_steps(proc: subprocess.Popen, until: str | None = None, timeout: float = 30 * SLOW) -> list[dict]:
    """Scenario step lines, up to `until` (or to the end of the process)."""
    steps = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        steps.append(json.loads(line))
        if until is not None and steps[-1]["step"] == until:
            break
        if time.monotonic() > deadline:
            break
    return steps


def bpf_prog_ids() -> set[int]:
    """IDs of the BPF programs loaded in the kernel (bpftool), for leak checks."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def bpf_objects(pid: int) -> dict[str, set[int]]:
    """The BPF programs, maps and links process `pid` holds ({"prog": ids,
    "map": ids, "link": ids}), from its descriptors' fdinfo: exactly its own,
    whatever other tracers run on the host."""
    held: dict[str, set[int]] = {"prog": set(), "map": set(), "link": set()}
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("prog_id", "map_id", "link_id"):
                held[key.removesuffix("_id")].add(int(value))
    return held


def bpf_alive() -> dict[str, set[int]]:
    """IDs of every BPF program, map and link in the kernel (bpftool)."""
    alive = {}
    for kind in ("prog", "map", "link"):
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
        alive[kind] = {x["id"] for x in json.loads(out or "[]")}
    return alive


def left_attached(held: dict[str, set[int]]) -> dict[str, set[int]]:
    """What of `held` (bpf_objects of a tracer, taken while it ran) the kernel
    still has; {} when nothing. Freeing is asynchronous (RCU): asked again
    for up to 2 s."""
    deadline = time.monotonic() + 2
    while True:
        alive = bpf_alive()
        left = {k: held[k] & alive[k] for k in held if held[k] & alive[k]}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 10) -> dict[str, float]:
    """The tracer's Prometheus metrics (--metrics), sample name -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
