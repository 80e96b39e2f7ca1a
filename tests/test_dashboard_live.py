"""Live: the `top` dashboard driven in a real terminal (tmux, 80x24) during a
real collision, its screen captured and checked; and its plain-line mode when
stdout is not a terminal."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from tests.live import BACKEND, BIN, REPO, SLOW, read_steps, require_live, scenario

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()
    if not shutil.which("tmux"):
        pytest.fail("tmux is missing (scripts/setup installs it)")


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          check=True).stdout


def wait_screen(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = screen(session)
        if text in out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_top_in_a_terminal(ns):
    session = f"tct-top-{ns.inode}"
    cmd = f"cd {REPO} && {BIN} --backend {BACKEND} --netns {ns.inode} top; echo EXIT=$?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], check=True)
    try:
        first = wait_screen(session, "Ctrl-C to stop", 60 * SLOW)
        # the status line is one line of the 80 columns
        assert any("backend" in line and "0 collisions" in line for line in first.splitlines()), first
        proc = scenario("--server-ns", ns.name, "--fast", "--accept", "--server-comm", "leakydash", "--hold", "3")
        read_steps(proc, until="connected")
        shown = wait_screen(session, "recovered", 15 * SLOW)
        proc.wait(timeout=30 * SLOW)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        final = wait_screen(session, "EXIT=", 20 * SLOW)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = shown.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert any("backend" in line and "1 collisions" in line for line in lines), shown
    assert "127.0.0.1:39836 -> 127.0.0.1:12345" in shown and "recovered_fast" in shown
    assert "leakydash" in shown and "12345" in shown
    assert "EXIT=0" in final and "summary: 1 collision(s) (1 recovered)" in final, final


def test_top_without_a_terminal_prints_plain_lines(ns):
    top = subprocess.Popen([str(BIN), "top", "--backend", BACKEND, "--netns", str(ns.inode)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = top.stdout.readline()
        assert first.startswith("ready: backend"), first
        proc = scenario("--server-ns", ns.name, "--fast", "--hold", "0.3")
        read_steps(proc)
        line = top.stdout.readline()
        top.send_signal(signal.SIGINT)
        rest = top.communicate(timeout=30 * SLOW)[0]
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0
    assert line.startswith("collision #1 127.0.0.1:39836 -> 127.0.0.1:12345 CLOSE_WAIT recovered_fast"), line
    assert "\x1b" not in line + rest  # no escape sequences when not a terminal
    assert rest.strip().splitlines()[-1].startswith("summary: 1 collision(s) (1 recovered)")
