"""Live: a burst of collisions against the challenge-ACK limit
(net.ipv4.tcp_challenge_ack_limit), with the kernel's own counters as the truth.

Before Linux 6.0 the limit is host-wide (one counter refilled every second to
between limit/2 and 1.5 x limit: 500 to 1,499 by default), and a burst of a few
thousand collisions outruns it; since 6.0 it is per network namespace and
unlimited by default. The test sets a small limit in its own namespace, where
both kernels apply it, so that a burst of BURST collisions always outruns one
second's budget: the SYNs whose challenge ACK the limit swallowed get no
answer, their clients wait a full retransmission timeout (1 s) and try again.

What must hold: the tracer's challenge ACKs sent and held back add up to the
kernel's counters in the namespace (TcpExtTCPChallengeACK; TcpExtTCPSYNChallenge
less it), collision for collision: every collision one of whose challenge ACKs
was held back is reported recovered after a full RTO with a penalty of at least
that timeout, every other one recovered fast.

Needs a challenge hook (fentry or kprobe on tcp_send_challenge_ack, or fexit on
tcp_rcv_state_process): the tracepoint backend infers the ACK from the
per-socket limiter's stamp, which the challenge-ACK limit does not move, and
says so in its hook notes; there the test is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.live import REPO, SLOW, Tracer, require_live
from tests.test_overflow_live import sound

pytestmark = [pytest.mark.live, pytest.mark.matrix, pytest.mark.rt]

BURST = 24
LIMIT = 16  # a second's budget: 8 to 23 challenge ACKs; a burst spanning two seconds: at least 16
RTO_MS = 1000  # TCP_TIMEOUT_INIT: a SYN without an answer is sent again after a second


@pytest.fixture(autouse=True)
def _live():
    require_live()


def test_challenge_acks_held_back_by_the_limit_are_each_reported_and_add_up_to_the_kernels_counts(ns):
    ns.sysctl("net.ipv4.tcp_challenge_ack_limit", str(LIMIT))
    tracer = Tracer("--netns", str(ns.inode), "--state-hook", "always")
    try:
        ready = tracer.wait_ready()
        challenge = next(h for h in ready["hooks"] if h["logical"] == "challenge_ack")
        if not challenge["available"]:
            tracer.kill()
            pytest.skip(f"no challenge hook on this backend ({challenge['note']})")
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns.name, "--burst", str(BURST),
             "--client-port-base", "21000", "--keep-dead", "30", "--drain", str(30 * SLOW)],
            capture_output=True, text=True, cwd=REPO, timeout=120 * SLOW)
        assert proc.returncode == 0, proc.stderr
        made = json.loads(proc.stdout.splitlines()[-1])
        time.sleep(2 * SLOW)
        rc, records, stderr = tracer.stop()
    finally:
        tracer.kill()
    assert rc == 0, stderr
    assert made["type"] == "done" and made["collisions"] == BURST and made["established"] == BURST, made
    kernel = made["kernel"]
    # the burst really outran the limit, or this test proves nothing
    held_back = kernel["TCPSYNChallenge"] - kernel["TCPChallengeACK"] - kernel["TCPACKSkippedChallenge"]
    assert held_back > 0, kernel
    cols = [r for r in records if r["type"] == "collision"]
    assert len(cols) == BURST and not [r for r in cols if r["incomplete"]], [r["incomplete_reasons"] for r in cols]
    assert all(sound(r) for r in cols), json.dumps([r for r in cols if not sound(r)][:1])[:2000]
    assert sum(r["syn_hits"] for r in cols) == kernel["TCPSYNChallenge"], kernel
    assert sum(r["challenge_acks_sent"] for r in cols) == kernel["TCPChallengeACK"], kernel
    assert sum(r["challenge_acks_limited"] for r in cols) == kernel["TCPSYNChallenge"] - kernel["TCPChallengeACK"]
    for r in cols:
        if r["challenge_acks_limited"]:
            assert r["outcome_detail"] == "recovered_after_rto" and r["penalty_ms"] >= RTO_MS * 0.9, r
        else:
            assert r["outcome_detail"] == "recovered_fast", r
