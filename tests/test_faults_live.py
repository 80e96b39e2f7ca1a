"""Live fault tests (real BPF programs, real sockets in namespaces the tracer
or the test makes): the tracer on a host in trouble."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.live import BIN, SLOW

pytestmark = pytest.mark.live


def test_a_full_disk_under_record_stops_the_recording_not_the_tracing(tmp_path):
    """--record on a tmpfs of 64 KiB the test fills to one page (4 KiB) from full: the header fits, the rest of the demo's 4.7 KiB does not:
    the demo's collision is still reported, one error line says the
    recording stopped and where, the summary says so, and the file replays
    up to there without a traceback."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 4096))
        rec = disk / "run.rec"
        r = subprocess.run([str(BIN), "demo", "--json", "--record", str(rec)], capture_output=True, text=True,
                           timeout=120 * SLOW)
        records = [json.loads(x) for x in r.stdout.splitlines()]
        errors = [x for x in r.stderr.splitlines() if x.startswith("tcpcollide-trace:")]
        size = rec.stat().st_size
        replayed = subprocess.run([str(BIN), "replay", "--json", str(rec)], capture_output=True, text=True,
                                  timeout=60 * SLOW)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert [x["type"] for x in records if x["type"] == "collision"] == ["collision"]
    assert len(errors) == 1 and "the recording" in errors[0] and "No space left on device" in errors[0], errors
    summary = records[-1]
    assert summary["type"] == "summary"
    assert summary["recording"]["stopped"] == "No space left on device"
    assert summary["recording"]["stopped_at_bytes"] == size
    assert "Traceback" not in replayed.stderr
    assert replayed.returncode in (0, 1)
    if replayed.returncode == 1:  # cut inside a frame: one line that says so
        assert len(replayed.stderr.strip().splitlines()) == 1 and "replayed" in replayed.stderr
