"""Live: a burst of collisions at the same moment on as many ports (a
connection pool's clients reconnecting after a hiccup), against the real
tracer. scripts/storm.py --burst first leaves N server sockets in CLOSE_WAIT,
then all N clients reconnect from their ports as fast as one loop can call
connect(). The generator knows each collision it made and that every client
was established.

What must hold, whatever user space keeps up with: the kernel's own count
(the summary's `kernel`) is exactly the collisions made; every collision is
reported, or the shortfall is counted (`unreported`); no port is reported
twice or one that did not collide; and a report not marked incomplete is
right (recovered, with the SYN, the RST, the socket's death and the new
connection), never a `pending` the generator knows is false.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.live import REPO, SLOW, Tracer, require_live
from tests.test_overflow_live import sound

pytestmark = [pytest.mark.live, pytest.mark.rt]  # rt: scripts/guest-run runs it on PREEMPT_RT

BURST = 400


@pytest.fixture(autouse=True)
def _live():
    require_live()


def burst(ns: str, n: int, base: int) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns, "--burst", str(n),
         "--client-port-base", str(base), "--keep-dead", "30"],
        capture_output=True, text=True, cwd=REPO, timeout=180 * SLOW)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines and lines[-1]["type"] == "done", lines
    return lines[-1]


@pytest.mark.parametrize("state_hook", ["lazy", "always"])
def test_a_burst_is_reported_collision_for_collision_or_the_shortfall_is_said(ns, state_hook):
    tracer = Tracer("--netns", str(ns.inode), "--state-hook", state_hook)
    try:
        tracer.wait_ready()
        made = burst(ns.name, BURST, 20000)
        time.sleep(2 * SLOW)
        rc, records, stderr = tracer.stop()
    finally:
        tracer.kill()
    assert rc == 0, stderr
    # the burst really happened, or this test proves nothing
    assert made["collisions"] == BURST and made["established"] == BURST, {k: v for k, v in made.items()
                                                                           if k != "per_port"}
    summary = records[-1]
    cols = [r for r in records if r["type"] == "collision"]
    kernel = summary["kernel"]
    print(f"burst ({state_hook}): {len(cols)} of {BURST} reported, "
          f"{sum(1 for r in cols if r['incomplete'])} incomplete, "
          f"{sum(1 for r in cols if r['outcome'] == 'pending')} pending; events {summary['events']}, "
          f"lost {summary['lost_events']}; kernel {kernel}")
    assert kernel["collisions"] == BURST, kernel
    assert kernel["unreported"] == BURST - len(cols) and kernel["reported"] == len(cols)
    ports = [int(r["client"].rsplit(":", 1)[1]) for r in cols]
    assert len(ports) == len(set(ports)) and set(ports) <= {int(p) for p in made["per_port"]}
    wrong = [r for r in cols if not r["incomplete"] and not sound(r)]
    assert not wrong, json.dumps(wrong[:2])[:3000]
    for r in cols:
        if r["incomplete"]:
            assert r["incomplete_reasons"], r
