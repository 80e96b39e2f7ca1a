"""Live: record a real run (real BPF, the seed scenario with a leaking server
process, two rounds on the same port) and replay it without root: the
replayed incidents equal the live ones, in JSON, with -v, and as text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.live import BIN, SLOW, Tracer, read_steps, require_live, scenario

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def rec_dir():
    """A directory an unprivileged user can read: replay needs neither root nor BPF."""
    d = Path(tempfile.mkdtemp(prefix="tcpcollide-replay-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_replay_rebuilds_the_live_incidents(ns, rec_dir):
    path = rec_dir / "run.rec"
    tracer = Tracer("--netns", str(ns.inode), "-v", "--record", str(path))
    try:
        tracer.wait_ready()
        proc = scenario("--server-ns", ns.name, "--fast", "--accept", "--unread", "10", "--rounds", "2",
                        "--hold", "0.5")
        steps = read_steps(proc)
        assert proc.wait(timeout=30 * SLOW) == 0, steps
        time.sleep(1.0)
        rc, records, stderr = tracer.stop(signal.SIGTERM)
    finally:
        tracer.kill()
    assert rc == 0, stderr
    live = [r for r in records if r["type"] == "collision"]
    assert len(live) == 2 and live[0]["closewait_socket"]["owners"], live
    os.chmod(rec_dir, 0o755)
    os.chmod(path, 0o644)
    r = as_nobody("--json", "-v", "replay", str(path))
    assert r.returncode == 0, r.stderr
    replayed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x for x in replayed if x["type"] == "collision"] == live
    summary = replayed[-1]
    assert summary["type"] == "summary" and summary["collisions"] == 2
    assert summary["stopped_by"] == "SIGTERM" and summary["replay_of"]["backend"] == live[0]["backend"]
    plain = as_nobody("--json", "replay", str(path))
    assert [json.loads(x) for x in plain.stdout.splitlines()][:2] == [
        {k: v for k, v in rec.items() if k != "events"} for rec in live]
    text = as_nobody("--no-color", "replay", str(path))
    assert text.returncode == 0 and "collision #2" in text.stdout and "leakysrv" in text.stdout
    # cut short (a tracer killed mid-write): what is there is still replayed, the error names the offset
    cut = rec_dir / "cut.rec"
    data = path.read_bytes()
    cut.write_bytes(data[:-7])
    os.chmod(cut, 0o644)
    r = as_nobody("--json", "replay", str(cut))
    assert r.returncode == 1 and r.stderr.startswith("tcpcollide-trace: error: ") and "byte offset" in r.stderr
    assert len([x for x in map(json.loads, r.stdout.splitlines()) if x["type"] == "collision"]) == 2
