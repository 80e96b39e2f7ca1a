"""Live: the collision through address translation (issue 25). The real
tracer, real BPF programs, real sockets, and a real nftables NAT in three
network namespaces the test makes (tracer/host/natlab.py: a client host, a
router translating, a server host), its conntrack timeouts shortened so that
it forgets a closed connection's mapping while the server's end lingers in
CLOSE_WAIT.

Each kind of translation, IPv4 and IPv6: masquerade (another client is
mapped onto the port the server still holds), SNAT onto a one-port range,
and DNAT (a published port in front of the leaking server). For each:
- one collision, one report: `view: both`, counted once in the summary,
  and the kernel's own count agrees;
- each end named as it sees itself, and the translation with both tuples
  equal to the lab's, its kind, and conntrack's entry found in the router's
  namespace (the entry's tuples are the connection's);
- what the exchange cost, against the client's own connect() time, and who
  reset the lingering socket (the client, whose RST the router translated).

Two tracers, one on the client's namespace and one on the server's,
recording: `replay client.rec server.rec` joins them into the same one
report across the NAT. And the router's variants (`ct state invalid drop`,
nf_conntrack_tcp_be_liberal): the exchange and its report as the kernel's
conntrack makes them (the challenge ACK to a SYN_SENT entry is let through
on every kernel Debian ships: docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import BIN, REPO, SLOW, Tracer, agrees_with_connect, late_hook, ns_name, read_steps, require_live, \
    scenario
from tracer.host.natlab import SERVER_PORT, NatLab

pytestmark = pytest.mark.live
ATTEMPTS = 3
PENALTY_TOLERANCE_MS = 3 * SLOW


@pytest.fixture(autouse=True)
def _live():
    require_live()


def run_lab(lab: NatLab, *tracer_sets: tuple[str, ...]) -> tuple[list[dict], list[list[dict]]]:
    """The lab's collision traced by tracers with these argument sets; the
    scenario's steps and each tracer's records."""
    tracers = [Tracer("--incident-timeout", str(int(10 * SLOW)), *args) for args in tracer_sets]
    try:
        for t in tracers:
            t.wait_ready()
        proc = scenario(*lab.scenario_args(), "--connect-timeout", str(8 * SLOW))
        steps = read_steps(proc)
        proc.wait(timeout=30 * SLOW)
        out = []
        for t in tracers:
            rc, records, err = t.stop()
            assert rc == 0, err
            out.append(records)
        return steps, out
    finally:
        for t in tracers:
            t.kill()


def ours(records: list[dict], lab: NatLab) -> list[dict]:
    ends = lab.tuples()
    servers = {ends["before"]["server"], ends["after"]["server"]}
    return [r for r in records if r["type"] == "collision" and r["server"] in servers]


def check_report(rec: dict, lab: NatLab, connect_ms: float) -> None:
    ends = lab.tuples()
    assert rec["view"] == "both", rec
    assert rec["server"] == ends["after"]["server"] and rec["client"] == ends["before"]["client"]
    assert rec["netns"] == lab.inodes["server"] and rec["client_netns"] == lab.inodes["client"]
    t = rec["translation"]
    assert t["kind"] == ("dnat" if lab.kind == "dnat" else "snat") and t["seen_by"] == "both_ends"
    assert t["before"] == ends["before"] and t["after"] == ends["after"], t
    ct = t["conntrack"]
    assert ct is not None and ct["netns"] == lab.inodes["router"], (t["conntrack_unknown"], t)
    assert ct["original"] == {"src": ends["before"]["client"], "dst": ends["before"]["server"]}
    assert ct["reply"] == {"src": ends["after"]["server"], "dst": ends["after"]["client"]}
    assert ("dst_nat" if lab.kind == "dnat" else "src_nat") in ct["status"]
    assert ct["timeouts_s"]["close_wait"] == 1
    assert t["rst_from"] == "client" and t["challenge_ack_reached_client"] is True
    assert (rec["challenge_acks_sent"], rec["challenge_acks_received"]) == (1, 1), (rec["steps"], rec["backend"])
    # a challenge hook's run the kernel skipped (kprobe, 5.10 under emulation) is said, and the count is right
    assert rec["outcome"] == "recovered" and rec["incomplete_reasons"] in ([], ["event_missed"]), rec
    assert agrees_with_connect(rec["penalty_ms"], connect_ms, PENALTY_TOLERANCE_MS), (rec["penalty_ms"], connect_ms)
    assert [s["step"] for s in rec["steps"]][:4] == ["syn", "challenge_ack", "rst", "closewait_closed"]
    words = "forwarded the connection" if lab.kind == "dnat" else f"mapped the client {ends['before']['client']}"
    assert words in rec["explanation"] and f"network namespace {lab.inodes['router']}" in rec["explanation"]


def collide(kind: str, family: int, **variant) -> tuple[NatLab, dict, float, dict]:
    """The lab's collision, unfiltered: (lab, report, connect_ms, summary)."""
    for attempt in range(ATTEMPTS):
        with NatLab(ns_name("nat"), kind, family, **variant) as lab:
            steps, (records,) = run_lab(lab, ())
            assert steps[-1]["step"] == "connected", steps
            if late_hook(records) and attempt < ATTEMPTS - 1:
                continue
            mine = ours(records, lab)
            assert len(mine) == 1, mine  # one collision, one report
            summary = records[-1]
            assert summary["type"] == "summary" and summary["collisions"] == 1, [(r["view"], r["server"], r["client"], r["outcome_detail"], [s["step"] for s in r["steps"]]) for r in records if r["type"] == "collision"]
            rows = [r for r in summary["kernel"]["by_server"] if r["netns"] == lab.inodes["server"]]
            assert [r["collisions"] for r in rows] == [1] and summary["kernel"]["unreported"] == 0
            return lab, mine[0], steps[-1]["connect_ms"], lab.counters()
    raise AssertionError("unreachable")


@pytest.mark.matrix
def test_masquerade_ipv4_is_one_report_naming_the_translation():
    lab, rec, connect_ms, counters = collide("masquerade", 4)
    check_report(rec, lab, connect_ms)
    assert counters["router_rst"] == 0  # the router's own stack answered nothing: the client's RST was translated


@pytest.mark.parametrize("kind,family", [("masquerade", 6), ("snat", 4), ("snat", 6), ("dnat", 4), ("dnat", 6)])
def test_each_translation(kind, family):
    lab, rec, connect_ms, _ = collide(kind, family)
    check_report(rec, lab, connect_ms)


@pytest.mark.parametrize("variant", [{"invalid": "drop"}, {"liberal": True}])
def test_conntrack_variants_report_what_the_router_did(variant):
    """With the router dropping what conntrack judges invalid, or judging
    liberally: the challenge ACK to the new connection's SYN_SENT entry is
    ignored by conntrack's state machine and let through, translated back
    (nothing counted invalid), and the client's RST answering it too: the
    same fast recovery, reported alike."""
    lab, rec, connect_ms, counters = collide("masquerade", 4, **variant)
    check_report(rec, lab, connect_ms)
    assert counters["invalid_forward"] == 0 and counters["router_rst"] == 0, counters


def replay(*args: str) -> list[dict]:
    r = subprocess.run([str(BIN), "replay", "--json", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=60 * SLOW)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_two_hosts_recordings_join_across_the_nat(tmp_path):
    """The client's host and the server's host each traced alone (a tracer
    per namespace, recording): each reports its end, under its own tuple;
    the join of the two recordings is the one report an unfiltered tracer
    writes, translation included."""
    for attempt in range(ATTEMPTS):
        with NatLab(ns_name("natj"), "masquerade", 4) as lab:
            client_rec, server_rec = tmp_path / f"client{attempt}.rec", tmp_path / f"server{attempt}.rec"
            steps, (cli, srv, both) = run_lab(
                lab, ("--netns", str(lab.inodes["client"]), "--record", str(client_rec)),
                ("--netns", str(lab.inodes["server"]), "--record", str(server_rec)), ())
            if any(late_hook(r) for r in (cli, srv, both)) and attempt < ATTEMPTS - 1:
                continue
            assert steps[-1]["step"] == "connected", steps
            (c,), (s,), (b,) = ours(cli, lab), ours(srv, lab), ours(both, lab)
            assert (c["view"], s["view"], b["view"]) == ("client", "server", "both")
            check_report(b, lab, steps[-1]["connect_ms"])
            # each end alone finds the translation in the router's conntrack
            assert c["translation"]["seen_by"] == s["translation"]["seen_by"] == "conntrack"
            assert c["translation"]["before"] == s["translation"]["before"] == lab.tuples()["before"]
            (j,) = ours(replay(str(client_rec), str(server_rec)), lab)
            assert j["view"] == "both" and j["joined"]["recordings"] == [str(client_rec), str(server_rec)], j["joined"]
            # each tracer's programs stamp the same kernel event a few microseconds apart
            for key in ("server", "client", "netns", "client_netns", "outcome_detail", "translation",
                        "challenge_acks_sent", "challenge_acks_received"):
                assert j[key] == b[key], (key, j[key], b[key])
            assert abs(j["penalty_ms"] - b["penalty_ms"]) < 0.1 * SLOW
            timeless = [{k: v for k, v in st.items() if not k.endswith("_ms")} for st in j["steps"]]
            assert timeless == [{k: v for k, v in st.items() if not k.endswith("_ms")} for st in b["steps"]]
            return


LISTENER = """
import socket, sys, time
listener = socket.create_server((sys.argv[1], int(sys.argv[2])), family=socket.AF_INET6 if ":" in sys.argv[1]
                                else socket.AF_INET, backlog=8)
print("ready", flush=True)
time.sleep(3600)  # never accept()s
"""


def test_a_containers_connection_through_the_nat_names_its_workload():
    """The client is a real container (Debian's podman with runc, joined to
    the lab's client namespace, as a Docker host's or a node's pod): the
    report names the connecting process and its container beside the
    translation, in the NAT's sentence too."""
    from tests.test_workload_live import _memory_cgroup  # noqa: PLC0415

    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman and runc are not installed (scripts/setup --for-tests installs them)")
    name = ns_name("natpod")
    try:
        base = _memory_cgroup()
    except StopIteration:  # no v1 memory hierarchy (pure cgroup v2): the unified path
        base = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::"))
    parent = f"{base.rstrip('/')}/{name}"
    podman = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
    with NatLab(ns_name("natc"), "masquerade", 4) as lab:
        p = lab.plan
        server = subprocess.Popen(["ip", "netns", "exec", lab.server.name, sys.executable, "-c", LISTENER, p.server,
                                   str(SERVER_PORT)], stdout=subprocess.PIPE, text=True)
        tracer = Tracer("--incident-timeout", str(int(10 * SLOW)))
        try:
            assert server.stdout.readline().strip() == "ready"
            tracer.wait_ready()
            args = [a for a in lab.scenario_args() if a not in ("--server-ns", "--client-ns", lab.server.name,
                                                                lab.client.name)]
            r = subprocess.run([*podman, "run", "--rm", "--name", name, "--cgroup-parent", parent,
                                "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000",
                                "--cap-add", "NET_ADMIN",  # TCP_REPAIR: the first client leaves silently
                                f"--network=ns:{lab.client.path}", "--workdir", str(REPO), "--env",
                                f"PYTHONPATH={REPO}", "--rootfs", "/:O", sys.executable, "-m", "tracer.host.scenario",
                                *args, "--external-server", "--connect-timeout", str(8 * SLOW)],
                               capture_output=True, text=True, timeout=120 * SLOW)
            steps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            assert steps and steps[-1]["step"] == "connected", (r.stdout, r.stderr)
            rc, records, err = tracer.stop()
            assert rc == 0, err
        finally:
            tracer.kill()
            server.kill()
            server.wait()
            subprocess.run([*podman, "rm", "-f", "-t", "0", name], capture_output=True, timeout=60 * SLOW)
            for made in sorted(Path("/sys/fs/cgroup").glob(f"**{parent}"), key=lambda q: -len(q.parts)):
                for d in sorted((q for q in [made, *made.rglob("*")] if q.is_dir()), key=lambda q: -len(q.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
        (rec,) = ours(records, lab)
    assert rec["view"] == "both" and rec["translation"]["kind"] == "snat", rec
    assert rec["translation"]["before"] == lab.tuples()["before"]
    proc = rec["client_process"]
    assert proc["workload"]["container"]["runtime"] == "podman" and proc["workload"]["container"]["name"] == name
    assert f"mapped the client {lab.tuples()['before']['client']} ({proc['comm']}, pid {proc['pid']}, in {name}) " \
           f"onto {lab.tuples()['after']['client']}" in rec["explanation"], rec["explanation"]


def test_a_challenge_ack_lost_behind_the_nat_is_one_stuck_report():
    """The router drops the challenge ACK on its way back (a firewall on the
    path, as when a pod's conntrack entries are scrubbed): the client never
    hears why its SYNs go unanswered and gives up. One report, from the
    server's end (the client's kernel saw nothing of the collision), stuck
    with the challenge ACKs lost, its translation named from the router's
    conntrack entry (still in SYN_SENT), and no claim that the ACK reached
    the client."""
    with NatLab(ns_name("natd"), "masquerade", 4) as lab:
        tracer = Tracer("--incident-timeout", str(int(20 * SLOW)))
        try:
            tracer.wait_ready()
            proc = scenario(*lab.scenario_args(), "--wait-stdin", "--connect-timeout", str(4 * SLOW), "--hold", "0",
                            stdin=subprocess.PIPE)
            read_steps(proc, until="waiting")
            lab.drop_bare_acks()
            proc.stdin.write("\n")
            proc.stdin.flush()
            steps = read_steps(proc)
            proc.wait(timeout=60 * SLOW)
            counters = lab.counters()
            rc, records, err = tracer.stop()
            assert rc == 0, err
        finally:
            tracer.kill()
        assert steps[-1]["step"] == "connect_failed", steps
        (rec,) = ours(records, lab)
    assert counters["dropped_ack"] >= 2 and counters["rst_from_client"] == 0, counters
    assert rec["view"] == "server" and rec["syn_hits"] >= 2, rec
    assert (rec["outcome"], rec["stuck_reason"]) == ("stuck", "stuck_challenge_ack_lost"), rec
    assert rec["challenge_acks_sent"] >= 2 and rec["challenge_acks_received"] == 0
    t = rec["translation"]
    assert t["seen_by"] == "conntrack" and t["kind"] == "snat" and t["before"] == lab.tuples()["before"], t
    assert t["conntrack"]["tcp_state"] == "SYN_SENT" and t["conntrack"]["netns"] == lab.inodes["router"]
    assert t["challenge_ack_reached_client"] is None and t["rst_from"] is None
    assert "let the challenge ACK (a bare ACK from the server port) through the firewall or NAT" in rec["explanation"]
