"""Live: Prometheus metrics scraped over HTTP during a real collision (real
BPF, the seed scenario in a namespace the test makes)."""

from __future__ import annotations

import socket

import pytest

from tests.live import SLOW, Tracer, free_port, read_steps, require_live, scenario, scrape

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()




def test_metrics_during_a_collision(ns):
    port = free_port()
    tracer = Tracer("--netns", str(ns.inode), "--metrics", f"127.0.0.1:{port}")
    try:
        tracer.wait_ready()
        before = scrape(port)
        assert before.get("tcpcollide_events_total") == 0
        assert not any(k.startswith("tcpcollide_collisions_total") for k in before)
        up = {k: v for k, v in before.items() if k.startswith("tcpcollide_hook_up{")}
        assert up[next(k for k in up if 'logical="syn_challenged"' in k)] == 1
        proc = scenario("--server-ns", ns.name, "--fast", "--hold", "4")
        read_steps(proc, until="connected")
        rec = tracer.wait_for("collision", 15 * SLOW)
        assert rec is not None
        after = scrape(port)
        proc.kill()
        proc.wait()
        tracer.stop()
    finally:
        tracer.kill()
    key = ('tcpcollide_collisions_total{lingering_state="CLOSE_WAIT",outcome="recovered",'
           f'outcome_detail="{rec["outcome_detail"]}",server_port="12345"}}')
    assert after[key] == 1, sorted(after)
    assert after["tcpcollide_penalty_seconds_count"] == 1
    assert abs(after["tcpcollide_penalty_seconds_sum"] - rec["penalty_ms"] / 1000) < 1e-6
    assert after["tcpcollide_events_total"] >= 5 and after["tcpcollide_lost_events_total"] == 0
    # the seed's ghost, as a gauge per listener (what `ss` would show as Recv-Q 2: 1 alive, 1 dead)
    labels = f'{{listener="127.0.0.1:12345",netns="{ns.inode}"}}'
    assert after["tcpcollide_listener_ghosts" + labels] == 1
    assert after["tcpcollide_listener_queue_length" + labels] == 2


def test_metrics_port_in_use_is_one_clear_error(ns):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tracer = Tracer("--netns", str(ns.inode), "--no-selftest", "--metrics", f"127.0.0.1:{port}")
        rc = tracer.proc.wait(timeout=60 * SLOW)
        err = tracer.proc.stderr.read()
    assert rc == 1
    assert err.startswith("tcpcollide-trace: error: cannot serve metrics on") and "Traceback" not in err
