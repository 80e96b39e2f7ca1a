"""Live tests of the diagnosis: who holds the lingering socket, every outcome,
the accept-queue ghosts, inventory, and lingering states other than
CLOSE_WAIT. Real BPF, real sockets, namespaces made and removed by each test;
nftables rules (in those namespaces only) drop what a middlebox would.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from tests.live import BIN, REPO, SLOW, Tracer, ns_name, read_steps, require_live, scenario
from tracer.host import inventory, netns, sockdiag
from tracer.host.diagnosis import QUEUE_STATES

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()


# the workload of the tests' own processes on this machine kind: no unit, container
# or pod in their cgroup paths (0::/ and a memory cgroup of the machine's own)
HOST = {"unit": None, "container": None, "pod": None}


def nft(ns: netns.NetNS, *rules: str) -> None:
    script = "\n".join(rules) + "\n"
    r = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=script, text=True,
                       capture_output=True)
    assert r.returncode == 0, r.stderr


def trace_scenario(tracer_args: list[str], scenario_args: list[str], settle: float = 1.5,
                   expect_rc: int | None = 0, timeout: float = 30) -> tuple[list[dict], list[dict]]:
    tracer = Tracer(*tracer_args)
    try:
        tracer.wait_ready()
        proc = scenario(*scenario_args)
        steps = read_steps(proc, timeout=timeout * SLOW)
        rc = proc.wait(timeout=timeout * SLOW)
        if expect_rc is not None:
            assert rc == expect_rc, steps
        time.sleep(settle)
        rc, records, stderr = tracer.stop(signal.SIGTERM)
    finally:
        tracer.kill()
    assert rc == 0, stderr
    return steps, [r for r in records if r["type"] == "collision"]


@pytest.mark.matrix
def test_culprit_process_fd_and_unread_bytes_of_an_older_socket(ns):
    """A CLOSE_WAIT socket held by a named server process, older than the
    tracer: the report names its pid, command and fd, and the unread bytes."""
    proc = scenario("--server-ns", ns.name, "--fast", "--accept", "--server-comm", "leakysrv", "--unread", "100",
                    "--wait-stdin", "--hold", "0.5", stdin=subprocess.PIPE)
    tracer = None
    try:
        before = read_steps(proc, until="waiting")
        accepted = [s for s in before if s["step"] == "accepted"]
        assert accepted and before[-1]["step"] == "waiting", before
        tracer = Tracer("--netns", str(ns.inode))
        tracer.wait_ready()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        steps = read_steps(proc)
        assert proc.wait(timeout=30 * SLOW) == 0, steps
        time.sleep(1.0)
        rc, records, stderr = tracer.stop()
    finally:
        proc.kill()
        if tracer is not None:
            tracer.kill()
    assert rc == 0, stderr
    found = [r for r in records if r["type"] == "collision"]
    assert len(found) == 1, found
    rec = found[0]
    owner = {"pid": accepted[0]["pid"], "comm": "leakysrv", "fd": accepted[0]["fd"], "workload": HOST}
    assert rec["closewait_socket"]["owners"] == [owner]
    assert rec["closewait_socket"]["unread_bytes"] == 100
    assert rec["closewait_socket"]["ghost"] is False
    assert rec["closewait_age_source"] == "estimated"  # it entered CLOSE_WAIT before the tracer
    assert rec["outcome"] == "recovered" and rec["outcome_detail"] == "recovered_fast"
    assert f"leakysrv (pid {owner['pid']})" in rec["explanation"]
    assert f"never closes fd {owner['fd']}" in rec["explanation"]


@pytest.fixture
def two_hosts():
    with netns.NetNS(ns_name("srv")) as srv, netns.NetNS(ns_name("cli")) as cli:
        netns.veth(srv, cli, ["10.198.0.1/24"], ["10.198.0.2/24"], name=f"td{srv.inode % 100000}")
        yield srv, cli


DROP_CHALLENGE_ACK = (
    "table inet tct",
    "add chain inet tct in { type filter hook input priority 0; }",
    # the challenge ACK: a bare ACK from the server port (the SYN-ACK has SYN set)
    "add rule inet tct in tcp sport 12345 tcp flags & (syn | ack | rst | fin) == ack drop",
)


@pytest.mark.matrix
def test_stuck_when_a_middlebox_drops_the_challenge_ack(two_hosts):
    """An nftables rule in the client's namespace drops the challenge ACK: no
    RST comes back, the client keeps retransmitting its SYN into the
    CLOSE_WAIT socket; the incident ends stuck with its retransmissions."""
    srv, cli = two_hosts
    nft(cli, *DROP_CHALLENGE_ACK)
    args = ["--server-ns", srv.name, "--client-ns", cli.name, "--server-ip", "10.198.0.1",
            # the client must outlast the incident timeout (a slow guest scales that one), or it gives up first
            "--client-ip", "10.198.0.2", "--fast", "--connect-timeout", str(8 * SLOW), "--hold", "0"]
    tracer = Tracer("--incident-timeout", str(3.6 * SLOW), "-p", "12345")
    try:
        tracer.wait_ready()
        proc = scenario(*args)
        rec = tracer.wait_for("collision", 20 * SLOW)
        proc.kill()
        proc.wait()
        tracer.stop()
    finally:
        tracer.kill()
    assert rec is not None
    assert rec["outcome"] == "stuck", rec
    assert rec["outcome_detail"] == "stuck_challenge_ack_lost", rec
    assert not any(s["step"] == "rst" for s in rec["steps"]), rec["steps"]
    retries = [s for s in rec["steps"] if s["step"] == "retry_syn"]
    assert len(retries) >= 2 and rec["retransmissions"] == len(retries)  # at ~1 s and ~3 s
    assert all(s["reached"] == "lingering socket" for s in retries), retries
    assert rec["syn_hits"] == len(retries) + 1
    assert rec["challenge_acks_sent"] == rec["syn_hits"]
    assert "lost on the way" in rec["explanation"] and "firewall" in rec["explanation"]


def test_client_gives_up(two_hosts):
    """The same drop, and a client whose connect() times out first."""
    srv, cli = two_hosts
    nft(cli, *DROP_CHALLENGE_ACK)
    steps, found = trace_scenario(
        ["-p", "12345"],
        ["--server-ns", srv.name, "--client-ns", cli.name, "--server-ip", "10.198.0.1", "--client-ip", "10.198.0.2",
         "--fast", "--connect-timeout", str(1.6 * SLOW), "--hold", "0"], expect_rc=2)
    assert steps[-1]["step"] == "connect_failed", steps
    assert len(found) == 1, found
    rec = found[0]
    assert rec["outcome"] == "gave_up" and rec["outcome_detail"] == "client_gave_up", rec
    assert rec["stuck_reason"] == "stuck_challenge_ack_lost"
    assert [s["step"] for s in rec["steps"]][-1] == "client_closed"
    assert rec["penalty_ms"] is None


def test_the_same_port_colliding_again(ns):
    """Two rounds on the same port pair: the second incident names the first."""
    steps, found = trace_scenario(["--netns", str(ns.inode)],
                                  ["--server-ns", ns.name, "--fast", "--rounds", "2", "--hold", "0.3"])
    assert [s["step"] for s in steps].count("connected") == 2, steps
    assert len(found) == 2, found
    first, second = sorted(found, key=lambda r: r["id"])
    assert first["repeat_of"] is None
    assert second["repeat_of"] == {"id": first["id"], "same": "port"}
    assert second["outcome"] == "recovered"
    assert "incident #%d" % first["id"] in second["explanation"]


@pytest.mark.matrix
def test_seed_leaves_a_ghost_that_ss_counts(ns):
    """The seed's second experiment: the killed CLOSE_WAIT socket was never
    accepted and stays counted in the listener's Recv-Q; the report's queue
    matches what ss prints for the listener."""
    tracer = Tracer("--netns", str(ns.inode))
    try:
        tracer.wait_ready()
        proc = scenario("--server-ns", ns.name, "--fast", "--hold", "4")
        listen = read_steps(proc, until="connected")[0]
        comm = open(f"/proc/{proc.pid}/comm").read().strip()
        rec = tracer.wait_for("collision", 15 * SLOW)
        ss = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tlnH", "sport", "= :12345"],
                            capture_output=True, text=True, check=True).stdout.split()
        proc.wait(timeout=30 * SLOW)
        tracer.stop()
    finally:
        tracer.kill()
    assert rec is not None
    assert rec["closewait_socket"]["ghost"] is True
    recv_q, send_q = int(ss[1]), int(ss[2])
    # the listener's owner is the process that does not accept(): the scenario itself
    assert listen["step"] == "listen" and listen["pid"] == proc.pid
    owner = {"pid": proc.pid, "comm": comm, "fd": listen["fd"], "workload": HOST}
    assert rec["listener"] == {"listener": "127.0.0.1:12345", "recv_q": recv_q, "limit": send_q, "alive": 1,
                               "ghosts": 1, "full": False, "owners": [owner], "owners_unknown": None}
    assert rec["closewait_socket"]["owners"] == [] and rec["closewait_socket"]["owners_unknown"] == "never_accepted"
    assert recv_q == 2  # the dead socket and the new connection
    assert "ghost" in rec["explanation"]
    assert f"the program {comm} (pid {proc.pid}), fd {listen['fd']}" in rec["explanation"]


@pytest.mark.matrix
def test_last_ack_collision(ns):
    """A SYN hitting a LAST_ACK socket (the server closed, its FIN is dropped)
    is reported as a related incident with its own explanation."""
    nft(ns, "table inet tct", "add chain inet tct out { type filter hook output priority 0; }",
        "add rule inet tct out tcp sport 12345 tcp flags & fin == fin drop")
    steps, found = trace_scenario(["--netns", str(ns.inode)],
                                  ["--server-ns", ns.name, "--fast", "--accept", "--close-on-eof", "--hold", "0.3"])
    assert any(s["step"] == "server_closed" for s in steps), steps
    assert len(found) == 1, found
    rec = found[0]
    assert rec["lingering_state"] == "LAST_ACK", rec
    assert rec["outcome"] == "recovered"
    assert "LAST_ACK" in rec["explanation"] and "FIN was never acknowledged" in rec["explanation"]


LEAKY = textwrap.dedent("""
    import ctypes, json, socket, struct, sys, time
    from tracer.host import netns
    netns.enter(sys.argv[1])
    ctypes.CDLL(None).prctl(15, b"leakyinv")
    a = socket.create_server(("127.0.0.1", 8080), backlog=8)
    b = socket.create_server(("127.0.0.1", 9090), backlog=8)
    held = []
    for _ in range(2):  # 8080: accepted, then the peer hangs up: CLOSE_WAIT owned by us
        c = socket.create_connection(("127.0.0.1", 8080))
        s, _ = a.accept()
        held.append(s)
        c.sendall(b"y" * 7)
        c.close()
    clients = [socket.create_connection(("127.0.0.1", 9090)) for _ in range(3)]  # 9090: never accepted
    clients[0].close()  # -> CLOSE_WAIT, queued, alive
    clients[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    clients[1].close()  # RST -> dead in the queue: a ghost
    time.sleep(0.3)
    print(json.dumps({"fds": sorted(s.fileno() for s in held)}), flush=True)
    sys.stdin.read()
""")


def test_inventory_agrees_with_ss(ns):
    leaky = subprocess.Popen([sys.executable, "-c", LEAKY, ns.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        fds = json.loads(leaky.stdout.readline())["fds"]
        out = subprocess.run([str(BIN), "--json", "--netns", str(ns.inode), "inventory"], capture_output=True,
                             text=True, timeout=60)
        ss = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tanH"], capture_output=True, text=True,
                            check=True).stdout
        text = subprocess.run([str(BIN), "--no-color", "--netns", str(ns.inode), "inventory"], capture_output=True,
                              text=True, timeout=60)
    finally:
        leaky.kill()
        leaky.wait()
    assert out.returncode == 0, out.stderr
    inv = json.loads(out.stdout)
    rows = [line.split() for line in ss.splitlines()]
    cw = [r for r in rows if r[0] == "CLOSE-WAIT"]
    assert inv["closewait_total"] == len(cw) == 3
    mine = next(g for g in inv["closewait"] if g["comm"] == "leakyinv")
    assert mine["pid"] == leaky.pid and mine["local"] == "127.0.0.1:8080" and mine["count"] == 2
    assert mine["workload"] == HOST
    assert sorted(s["fd"] for s in mine["sockets"]) == fds
    assert mine["unread_bytes"] == 14
    assert sum(int(r[1]) - 1 for r in cw if r[3] == "127.0.0.1:8080") == 14  # ss counts the FIN as 1
    orphan = next(g for g in inv["closewait"] if g["pid"] is None)
    assert orphan["local"] == "127.0.0.1:9090" and orphan["count"] == 1 and orphan["workload"] is None
    listener = next(r for r in rows if r[0] == "LISTEN" and r[3] == "127.0.0.1:9090")
    (q,) = [q for q in inv["listeners"] if q["listener"] == "127.0.0.1:9090"]
    assert (q["recv_q"], q["limit"]) == (int(listener[1]), int(listener[2])) == (3, 8)
    assert q["alive"] == 2 and q["ghosts"] == 1
    assert not any(q["listener"] == "127.0.0.1:8080" for q in inv["listeners"])  # no ghosts there
    assert text.returncode == 0, text.stderr
    assert "leakyinv" in text.stdout and "9090" in text.stdout, text.stdout


def test_inventory_needs_root_and_says_so():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN), "inventory"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("tcpcollide-trace: error: ") and "root" in r.stderr
    assert "Traceback" not in r.stderr


def test_queue_overflow_because_of_ghosts(ns):
    """Backlog 1: after the collision the ghost and the new connection fill
    the queue; the next client's SYNs are dropped and the tracer says the
    queue overflows because of ghosts."""
    tracer = Tracer("--netns", str(ns.inode))
    try:
        tracer.wait_ready()
        proc = scenario("--server-ns", ns.name, "--fast", "--backlog", "1", "--hold", "6")
        read_steps(proc, until="connected")
        rec = tracer.wait_for("collision", 15 * SLOW)
        assert rec is not None
        assert rec["listener"]["full"] is True and rec["listener"]["ghosts"] == 1, rec["listener"]
        late = subprocess.run(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c",
             "import socket\ntry:\n socket.create_connection(('127.0.0.1', 12345), timeout=2.5)\n"
             "except OSError: print('refused')"], capture_output=True, text=True, timeout=30)
        queue = tracer.wait_for("queue", 5 * SLOW)
        proc.kill()
        proc.wait()
        tracer.stop()
    finally:
        tracer.kill()
    assert "refused" in late.stdout, late
    assert queue is not None
    assert queue["event"] == "overflow" and queue["overflows"] >= 1, queue
    assert queue["ghosts"] == 1 and queue["listener"] == "127.0.0.1:12345" and queue["collision"] == rec["id"]
    assert "ghosts" in queue["explanation"]


TIME_WAIT_SCENARIO = textwrap.dedent("""
    import json, socket, sys, threading, time
    from tracer.host import netns
    netns.enter(sys.argv[1])
    lst = socket.create_server(("127.0.0.1", 12345), backlog=8)
    c = socket.socket()
    c.bind(("127.0.0.1", 39836))
    c.connect(("127.0.0.1", 12345))
    s, _ = lst.accept()
    # move more data than the ISN clock (one tick per 64 ns) advances meanwhile,
    # so the next SYN's sequence number is below the old connection's
    blob = b"z" * (1 << 20)
    t = threading.Thread(target=lambda: [c.sendall(blob) for _ in range(64)])
    t.start()
    got = 0
    while got < 64 * len(blob):
        got += len(s.recv(1 << 20))
    t.join()
    s.close()  # the server closes first: its end goes to TIME_WAIT
    assert c.recv(1) == b""
    c.close()
    time.sleep(0.1)
    n = socket.socket()
    n.bind(("127.0.0.1", 39836))
    t0 = time.monotonic()
    n.connect(("127.0.0.1", 12345))
    print(json.dumps({"connect_ms": round((time.monotonic() - t0) * 1e3, 3)}), flush=True)
    time.sleep(0.5)
""")


def test_time_wait_collision(ns):
    """Without timestamps, a SYN below the old connection's numbers hits the
    server's TIME_WAIT socket: it answers with the old numbers, the client
    resets it and retries. Reported as a related incident (kfree_skb names
    the TIME_WAIT socket since Linux 6.11; elsewhere the tracer says it cannot
    see these)."""
    ns.sysctl("net.ipv4.tcp_timestamps", "0")
    tracer = Tracer("--netns", str(ns.inode))
    try:
        ready = tracer.wait_ready()
        hook = next(h for h in ready["hooks"] if h["logical"] == "timewait_syn")
        if not hook["available"]:
            tracer.stop()
            pytest.skip(f"this kernel does not show TIME_WAIT collisions: {hook['note']}")
        assert hook["selftested"] is False and hook["verified"] is None
        r = subprocess.run([sys.executable, "-c", TIME_WAIT_SCENARIO, ns.name], capture_output=True, text=True,
                           timeout=60 * SLOW, cwd=REPO)
        assert r.returncode == 0, r.stderr
        connect_ms = json.loads(r.stdout)["connect_ms"]
        rec = tracer.wait_for("collision", 10 * SLOW)
        tracer.stop()
    finally:
        tracer.kill()
    assert rec is not None
    assert rec["lingering_state"] == "TIME_WAIT", rec
    assert (rec["server"], rec["client"]) == ("127.0.0.1:12345", "127.0.0.1:39836")
    assert rec["outcome"] == "recovered", rec
    names = [s["step"] for s in rec["steps"]]
    assert names[:3] == ["syn", "challenge_ack", "rst"] and "established" in names, names
    ack = rec["steps"][1]
    rst = rec["steps"][2]
    assert rst["seq"] == ack["ack"] and rst["in_window"] is True  # the RST that kills the TIME_WAIT socket
    assert rec["closewait_socket"]["inode"] is None and rec["closewait_socket"]["ghost"] is False
    assert abs(rec["penalty_ms"] - connect_ms) < 5 * SLOW + 0.2 * connect_ms
    assert "TIME_WAIT" in rec["explanation"] and "tcp_timestamps" in rec["explanation"]


def test_queue_sockets_lists_only_what_a_listeners_queue_is_made_of(ns):
    """The per-collision queue query (in-kernel port filter, accepted sockets
    skipped unparsed) against the full dump on real sockets: the same queue
    for the port asked about, and nothing of another port or of an accepted
    socket."""
    def make():
        lst, other = socket.socket(), socket.socket()
        lst.bind(("127.0.0.1", 8080))
        lst.listen(8)
        other.bind(("127.0.0.1", 9090))
        other.listen(8)
        clients = [socket.create_connection(("127.0.0.1", 8080)) for _ in range(4)]
        clients.append(socket.create_connection(("127.0.0.1", 9090)))
        accepted = lst.accept()[0]  # clients[0]'s server end: held by a process now
        clients[0].close()  # -> the accepted end goes to CLOSE_WAIT (not queued)
        clients[1].close()  # -> a queued child in CLOSE_WAIT
        clients[2].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clients[2].close()  # RST -> a ghost: dead, still counted in the queue
        return [lst, other, accepted] + clients

    held = sockdiag.in_netns(str(ns.path), make)
    try:
        time.sleep(0.1)
        everything = sockdiag.list_sockets(QUEUE_STATES, ns.inode, ns_paths={ns.inode: str(ns.path)})
        fast = sockdiag.queue_sockets(ns.inode, str(ns.path), 8080, QUEUE_STATES)
    finally:
        for s in held:
            s.close()
    assert {(s.state, s.lport, bool(s.inode)) for s in everything} >= {("CLOSE_WAIT", 8080, True),
                                                                       ("LISTEN", 9090, True)}
    assert sorted((s.state, s.local, bool(s.inode)) for s in fast) == [
        ("CLOSE_WAIT", "127.0.0.1:8080", False), ("ESTABLISHED", "127.0.0.1:8080", False),
        ("LISTEN", "127.0.0.1:8080", True)]
    assert all(s.last_ack_recv_ms is None for s in fast)  # no tcp_info asked for

    def queue(socks):
        (q,) = [q for q in inventory.listener_queues(socks) if q["listener"] == "127.0.0.1:8080"]
        return q

    assert queue(fast) == queue(everything)
    assert (queue(fast)["recv_q"], queue(fast)["alive"], queue(fast)["ghosts"]) == (3, 2, 1)
