"""Live: a real perf buffer overflow, and what the tracer says about it.

The tracer is started, then stopped with SIGSTOP; a storm of real collisions
(scripts/storm.py: each of many client ports collides exactly once, so no
incident can be superseded by the next round on its port) fills its perf
buffer (tracer/session.py opens it with PERF_PAGES pages per CPU: some ten
thousand events per CPU, some eight events per collision) and the kernel
drops the rest. SIGCONT; then a few more collisions: the kernel writes its
"events lost" notice only with the next event on that CPU. Every client
hangs up after its collision (--hang-up-last), as clients do. The test first
proves the overflow happened (lost_events > 0), then checks that the loss is
reported and that no incident says something the generator knows is false.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.live import REPO, SLOW, Tracer, require_live
from tracer import session

# (not marked rt: in the emulated PREEMPT_RT guest the summary counted 25 collisions more than
# the test read (3154 against 3129, 2026-12-07), unexplained yet: see docs/kernels.md)
pytestmark = pytest.mark.live

STORM_PORTS = 6000  # collisions in the storm: far beyond what the buffer holds (2 MiB per CPU here)
AFTER_PORTS = 20  # collisions after the resume


@pytest.fixture(autouse=True)
def _live():
    require_live()


def storm(ns: str, ports: int, server_port: int, base: int) -> dict:
    """Each of `ports` client ports collides once; returns the generator's `done` line."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns, "--ports", str(ports), "--count", str(ports),
         "--duration", "0", "--server-port", str(server_port), "--client-port-base", str(base),
         "--keep-dead", "30", "--hang-up-last"],
        capture_output=True, text=True, cwd=REPO, timeout=120 * SLOW)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    done = lines[-1]
    assert done["type"] == "done", lines
    return done


def sound(rec: dict) -> bool:
    """What the generator knows of every collision it made: a CLOSE_WAIT
    socket hit, an RST, the lingering socket closed, the client established."""
    steps = {s["step"] for s in rec["steps"]}
    return (rec["lingering_state"] == "CLOSE_WAIT" and rec["outcome"] == "recovered"
            and {"syn", "rst", "closewait_closed", "established"} <= steps)


def test_perf_buffer_overflow_is_counted_reported_and_marked(ns):
    per_cpu_bytes = session.PERF_PAGES * 4096
    tracer = Tracer("--netns", str(ns.inode))
    try:
        tracer.wait_ready()
        tracer.proc.send_signal(signal.SIGSTOP)
        try:
            big = storm(ns.name, STORM_PORTS, 12345, 20000)
        finally:
            tracer.proc.send_signal(signal.SIGCONT)
        # it reads what its buffer kept, until its records stop coming: collisions made before that
        # would find the buffer still full, and be counted, not reported
        time.sleep(1.5 * SLOW)
        seen = -1
        while len(tracer.records) + tracer.lines.qsize() != seen:
            seen = len(tracer.records) + tracer.lines.qsize()
            time.sleep(2 * SLOW)
        after = storm(ns.name, AFTER_PORTS, 12346, 30000)  # brings the kernel's loss notice
        time.sleep(2 * SLOW)
        rc, records, stderr = tracer.stop(signal.SIGTERM)
    finally:
        tracer.kill()

    summary = records[-1]
    assert summary["type"] == "summary", records[-1]
    # the overflow really happened, or this test proves nothing
    assert big["collisions"] == STORM_PORTS, big
    assert summary["lost_events"] > 0, (
        f"no overflow: {big['collisions']} collisions with the tracer stopped did not overflow a perf buffer of "
        f"{per_cpu_bytes} bytes per CPU (events: {summary['events']}); make the storm bigger")
    assert rc == 0, stderr
    assert "Traceback" not in stderr, stderr

    cols = [r for r in records if r["type"] == "collision"]
    print(f"overflow: {summary['events']} events, {summary['lost_events']} lost; "
          f"{sum(1 for r in cols if r['incomplete'])} of {len(cols)} reports incomplete")
    storm_cols = [r for r in cols if r["server"] == "127.0.0.1:12345"]
    after_cols = [r for r in cols if r["server"] == "127.0.0.1:12346"]
    made_ports = {int(p) for p in big["per_port"]}

    # never more reports than collisions, never a port that did not collide, never one twice
    ports = [int(r["client"].rsplit(":", 1)[1]) for r in storm_cols]
    assert len(ports) == len(set(ports)) and set(ports) <= made_ports
    # some were reported from what the buffer kept, not all (the rest was lost)
    assert 0 < len(storm_cols) < STORM_PORTS, len(storm_cols)
    # the loss touched open incidents: they say so
    incomplete = [r for r in storm_cols if r["incomplete"]]
    assert incomplete, "no storm incident is marked incomplete although events were lost in the middle of the storm"
    for r in incomplete:
        assert "lost" in r["explanation"]
    # nothing wrong: a report not marked incomplete tells what really happened
    wrong = [r for r in storm_cols if not r["incomplete"] and not sound(r)]
    assert not wrong, json.dumps(wrong[:2])[:3000]
    # where the lost events hid the new connection's establishment, the kernel's socket list still
    # showed it: recovered, said how it is known, still incomplete (other steps may be missing)
    confirmed = [r for r in storm_cols if any(s["step"] == "established" and s.get("seen_by") == "sock_diag"
                                              for s in r["steps"])]
    print(f"overflow: {len(confirmed)} established found in the socket list afterwards; outcomes "
          f"{collections.Counter((r['outcome'], r['outcome_detail']) for r in storm_cols)}")
    for r in confirmed:
        assert r["outcome"] == "recovered" and r["outcome_detail"] == "recovered_unseen" and r["incomplete"], r
    # (the generator has exited by then, its sockets gone: nothing can be known of the rest, which stay
    # pending and incomplete; tests/test_faults_live.py keeps them open through a stopped tracer)
    # the loss was said as it happened: a storm record with when, and what
    storms = [r for r in records if r["type"] == "storm"]
    assert storms and all(r["time"] and r["since"] for r in storms)
    assert any(k in r["lost"] for r in storms for k in ("events_lost", "events_not_submitted")), storms
    # the collisions made after the loss are all reported, and right
    assert after["collisions"] == AFTER_PORTS, after
    assert sorted(int(r["client"].rsplit(":", 1)[1]) for r in after_cols) == sorted(int(p) for p in after["per_port"])
    # (some may be marked incomplete: the loss is placed conservatively, see Correlator.lost)
    wrong = [r for r in after_cols if not r["incomplete"] and not sound(r)]
    assert not wrong, json.dumps(wrong[:2])[:3000]
    # the summary counts what was reported
    assert summary["collisions"] == len(cols)
    # the kernel counted every collision, whatever the buffer lost, and the
    # shortfall is said: in the summary and, as it happened, in storm records
    kernel = summary["kernel"]
    assert kernel["collisions"] == STORM_PORTS + AFTER_PORTS, kernel
    assert kernel["reported"] == len(cols) and kernel["unreported"] == kernel["collisions"] - len(cols)
    storms = [r for r in records if r["type"] == "storm"]
    assert storms and any({"events_lost", "events_not_submitted"} & set(r["lost"]) for r in storms), storms
    assert sum(r["lost"].get("events_not_submitted", 0) for r in storms) == kernel["events_not_submitted"] > 0
