"""A storm of CLOSE_WAIT port collisions, with real sockets, for benchmarks and tests.

A leaking server (a child process, named by --server-comm) accepts every
connection and never closes one while it is alive: the peer's FIN leaves it in
CLOSE_WAIT. (It closes a descriptor only once the socket is dead, killed by
the collision that followed, and --keep-dead seconds later, so that the
tracer can still find the owner of each CLOSE_WAIT socket in /proc: its
descriptors stay bounded by --ports plus --keep-dead seconds of collisions.)

Clients, one per fixed source port (--ports of them from --client-port-base),
connect, hang up (FIN, then the socket is dropped silently in TCP_REPAIR mode
so the port is free at once: see tracer/host/scenario.py --fast) and reconnect
from the same port: every reconnect's SYN hits the CLOSE_WAIT socket the
previous round left, which is one collision per port per round. All clients
run in one non-blocking loop (epoll); reconnects are paced to --rate per
second (0: as fast as the loop goes), for --duration seconds or until
--count collisions were made.

The generator knows each collision it made (client port, round, and the
connect() latency the client paid: a collision costs the client a retried
SYN, >= a few ms). Output: JSON lines on stdout, `start` (server pid) and
`done` (totals, per-port counts, latencies, the rate reached).

    python scripts/storm.py --ports 256 --rate 1000 --duration 5 [--ns NAME]

--burst N instead makes N collisions at the same moment, once: N clients on
N ports (from --client-port-base) connect and hang up, until the server holds
N sockets in CLOSE_WAIT (counted with sock_diag's view, `ss`, and checked per
port: the client saw its FIN acknowledged), then after --burst-pause seconds
all N reconnect from their ports as fast as the loop can call connect(), and
the generator waits (at most --drain s) until every one is established. Its
`done` line says how many collisions it made (reconnects on a port whose
server end was in CLOSE_WAIT), how many clients ended established, how long
issuing the N connects took (`burst_s`) and until the last was established
(`settled_s`), and the deltas of the kernel's counters in the namespace
(TcpExtTCPSYNChallenge, TcpExtTCPChallengeACK, TcpExtTCPACKSkippedChallenge):
what the kernel itself counted, to compare with what a tracer reports.

    python scripts/storm.py --burst 1000 [--burst-pause 2] [--ns NAME]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import struct
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's tracer package
from tracer.host import netns, scenario  # noqa: E402

TCP_REPAIR = 19  # linux/tcp.h
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1
TCP_FIN_WAIT2 = 5  # tcp_info.tcpi_state (include/net/tcp_states.h: ABI)



def latency_summary(lat: list[float]) -> dict:
    """Median, p99, min and max of sorted connect() latencies (ms); None each when there are none."""
    if not lat:
        return {"median": None, "p99": None, "min": None, "max": None}
    return {"median": round(statistics.median(lat), 3), "p99": round(lat[int(0.99 * (len(lat) - 1))], 3),
            "min": round(lat[0], 3), "max": round(lat[-1], 3)}

def say(kind: str, **kw) -> None:
    sys.stdout.write(json.dumps({"type": kind, **kw}) + "\n")
    sys.stdout.flush()


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root with CAP_SYS_RESOURCE raises the hard limit too (a VM's init may set a low one)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    target = max(soft, min(want, hard if hard != resource.RLIM_INFINITY else want))
    if target > hard:
        target = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve(listener: socket.socket, comm: str, keep_dead: float) -> None:
    """The leaking server: accept everything, never read, never close a live
    connection. A new connection from a client port means the previous one
    from that port was killed by the collision's RST: its descriptor is
    closed keep_dead seconds later (closing a dead socket sends nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_NAME, comm.encode()[:15])
    held: dict[int, socket.socket] = {}
    dead: deque[tuple[float, socket.socket]] = deque()
    while True:
        conn, peer = listener.accept()
        now = time.monotonic()
        old = held.pop(peer[1], None)
        if old is not None:
            dead.append((now, old))
        held[peer[1]] = conn
        while dead and now - dead[0][0] >= keep_dead:
            dead.popleft()[1].close()


def tcp_state(s: socket.socket) -> int:
    return struct.unpack("B", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


class Slot:
    __slots__ = ("port", "sock", "round", "t0", "phase")

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.round = 0  # connections made from this port so far
        self.t0 = 0.0
        self.phase = "idle"  # idle | connecting | closing


def run(args: argparse.Namespace) -> int:
    nofile = raise_nofile(max(4 * max(args.ports, args.burst) + 256, 65536))
    if args.ns:
        netns.enter(args.ns)
    listener = scenario.listen(args.server_ip, args.server_port, args.backlog)
    with scenario.forked(serve, listener, args.server_comm, args.keep_dead) as server_pid:
        listener.close()
        if args.burst:
            return burst(args, server_pid, nofile)
        return clients(args, server_pid, nofile)


KERNEL_COUNTERS = ("TCPSYNChallenge", "TCPChallengeACK", "TCPACKSkippedChallenge")


def tcpext() -> dict[str, int]:
    """The TcpExt counters of the calling thread's network namespace (what
    `nstat` reads: /proc/net/netstat follows the thread's namespace)."""
    lines = Path("/proc/thread-self/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:])))
    return {}


def count_closewait(server_port: int) -> int:
    """Sockets in CLOSE_WAIT on the server port, in this namespace (`ss`)."""
    import subprocess  # noqa: PLC0415

    out = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( sport = :{server_port} )"],
                         capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def burst(args: argparse.Namespace, server_pid: int, nofile: int) -> int:
    """--burst N: N CLOSE_WAIT sockets first, then N collisions at once."""
    n = args.burst
    dst = (args.server_ip, args.server_port)
    ports = [args.client_port_base + i for i in range(n)]
    say("start", server_pid=server_pid, server=f"{args.server_ip}:{args.server_port}", ports=n, burst=n,
        rate=0, nofile=nofile, client_ip=args.client_ip)

    def open_all() -> dict[int, tuple[socket.socket, float]]:
        socks = {}
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.client_ip, port))
            s.setblocking(False)
            socks[port] = (s, time.monotonic())
            err = s.connect_ex(dst)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect from port {port}: {os.strerror(err)}")
        return socks

    def wait_established(socks, limit: float) -> tuple[dict[int, float], int, float]:
        """connect() latency (ms) per port that got through; failures; when the last one did."""
        sel = selectors.DefaultSelector()
        for port, (s, _t0) in socks.items():
            sel.register(s, selectors.EVENT_WRITE, port)
        done: dict[int, float] = {}
        failed, last = 0, time.monotonic()
        deadline = time.monotonic() + limit
        while len(done) + failed < len(socks) and time.monotonic() < deadline:
            for key, _mask in sel.select(0.05):
                port = key.data
                s, t0 = socks[port]
                sel.unregister(s)
                last = time.monotonic()
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                else:
                    done[port] = (last - t0) * 1e3
        sel.close()
        return done, failed, last

    # 1. N connections, then each client hangs up: the server's ends go to CLOSE_WAIT
    first = open_all()
    up, failed_setup, _ = wait_established(first, args.drain)
    if failed_setup or len(up) < n:
        say("error", note=f"setup: {len(up)} of {n} first connections established, {failed_setup} failed")
    for port in up:
        first[port][0].shutdown(socket.SHUT_WR)
    lingering: set[int] = set()
    deadline = time.monotonic() + args.drain
    pending = set(up)
    while pending and time.monotonic() < deadline:
        for port in list(pending):
            s = first[port][0]
            if tcp_state(s) == TCP_FIN_WAIT2:  # the server acknowledged our FIN: its end is in CLOSE_WAIT
                s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
                s.close()  # silently: the port is free at once
                pending.discard(port)
                lingering.add(port)
        if pending:
            time.sleep(0.001)
    for port in pending:
        first[port][0].close()
    closewait = count_closewait(args.server_port)
    time.sleep(args.burst_pause)
    # 2. all N reconnect at once
    before = tcpext()
    t0 = time.monotonic()
    second = open_all()
    t_issued = time.monotonic()
    est, failed, t_last = wait_established(second, args.drain)
    time.sleep(0.2)  # the last challenge ACKs and RSTs are counted by now
    after = tcpext()
    made = {p: 1 for p in est if p in lingering}
    lat = sorted(est[p] for p in made)
    say("done", collisions=len(made), attempted=len(lingering), failed=failed,
        unfinished=n - len(est) - failed,
        established=len(est), closewait_before=closewait, lingering_ports=len(lingering),
        burst_s=round(t_issued - t0, 4), settled_s=round(t_last - t0, 4),
        seconds=round(t_issued - t0, 4), rate=round(len(made) / (t_issued - t0), 1) if t_issued > t0 else 0.0,
        kernel={k: after.get(k, 0) - before.get(k, 0) for k in KERNEL_COUNTERS},
        per_port={str(p): c for p, c in sorted(made.items())},
        connect_ms=latency_summary(lat))
    if args.hold:
        time.sleep(args.hold)
    for s, _t0 in second.values():
        s.close()
    return 0


def clients(args: argparse.Namespace, server_pid: int, nofile: int) -> int:
    sel = selectors.DefaultSelector()
    slots = [Slot(args.client_port_base + i) for i in range(args.ports)]
    idle: deque[Slot] = deque(slots)
    closing: list[Slot] = []
    made: dict[int, int] = {}  # client port -> collisions made
    latencies: list[float] = []  # ms, connect() of each collision
    failed = 0
    dst = (args.server_ip, args.server_port)
    say("start", server_pid=server_pid, server=f"{args.server_ip}:{args.server_port}", ports=args.ports,
        rate=args.rate, nofile=nofile, client_ip=args.client_ip)

    def connect(slot: Slot) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.client_ip, slot.port))
        s.setblocking(False)
        err = s.connect_ex(dst)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect from port {slot.port}: {os.strerror(err)}")
        slot.sock, slot.t0, slot.phase = s, time.monotonic(), "connecting"
        sel.register(s, selectors.EVENT_WRITE, slot)

    def hang_up(slot: Slot) -> bool:
        """Drop the client end silently once the server acknowledged its FIN
        (FIN_WAIT2: the server end is in CLOSE_WAIT). False: not yet."""
        if tcp_state(slot.sock) != TCP_FIN_WAIT2:
            return False
        slot.sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        slot.sock.close()
        slot.sock, slot.phase = None, "idle"
        if not stopping:
            idle.append(slot)
        return True

    t_start = time.monotonic()
    deadline = t_start + args.duration if args.duration else float("inf")
    interval = 1.0 / args.rate if args.rate else 0.0
    next_at = t_start
    total = 0
    stopping = False
    while True:
        now = time.monotonic()
        if not stopping and (now >= deadline or (args.count and total >= args.count)):
            stopping = True
            t_end = now
        if stopping and not closing and not any(s.phase == "connecting" for s in slots):
            break
        if stopping and now > t_end + args.drain:
            break
        # reconnect idle ports, paced
        while not stopping and idle and (now >= next_at or idle[0].round == 0) \
                and not (args.count and total >= args.count):
            slot = idle.popleft()
            connect(slot)
            if slot.round > 0:  # a reconnect: a collision (the first connects are not paced)
                total += 1
                next_at = max(next_at + interval, now - 0.05) if interval else now
        timeout = 0.001 if closing else (max(0.0, min(next_at - now, 0.05)) if idle and not stopping else 0.05)
        for key, _mask in sel.select(timeout):
            slot: Slot = key.data
            sel.unregister(slot.sock)
            err = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                failed += 1
                slot.sock.close()
                slot.sock, slot.phase = None, "idle"
                idle.append(slot)
                continue
            if slot.round > 0:
                made[slot.port] = made.get(slot.port, 0) + 1
                latencies.append((time.monotonic() - slot.t0) * 1e3)
            slot.round += 1
            if stopping and not args.hang_up_last:
                slot.phase = "held"  # the last connection stays open
                continue
            slot.sock.shutdown(socket.SHUT_WR)
            slot.phase = "closing"
            if not hang_up(slot):
                closing.append(slot)
        if closing:
            closing = [s for s in closing if not hang_up(s)]
    elapsed = (t_end if stopping else time.monotonic()) - t_start
    n = sum(made.values())
    lat = sorted(latencies)
    say("done", collisions=n, attempted=total, failed=failed, unfinished=total - n - failed,
        seconds=round(elapsed, 3), rate=round(n / elapsed, 1) if elapsed else 0.0,
        per_port={str(p): c for p, c in sorted(made.items())},
        connect_ms=latency_summary(lat))
    if args.hold:
        time.sleep(args.hold)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/storm.py", description=__doc__.split("\n")[0])
    p.add_argument("--ns", default="", help="run in this named network namespace (ip netns)")
    p.add_argument("--server-ip", default="127.0.0.1")
    p.add_argument("--client-ip", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=12345)
    p.add_argument("--client-port-base", type=int, default=20000)
    p.add_argument("--ports", type=int, default=256, help="client ports (each collides once per round)")
    p.add_argument("--rate", type=float, default=0, help="collisions per second to aim at (0: as fast as possible)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of storm (0: until --count)")
    p.add_argument("--count", type=int, default=0, help="stop after this many collisions (0: no limit)")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--server-comm", default="stormsrv")
    p.add_argument("--hang-up-last", action="store_true",
                   help="at the end, hang up the last connections too (leaving them in CLOSE_WAIT) instead of "
                        "holding them open")
    p.add_argument("--keep-dead", type=float, default=1.0,
                   help="seconds the server keeps the descriptor of a socket the collision killed")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for connects still in flight")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to keep everything open at the end")
    p.add_argument("--burst", type=int, default=0,
                   help="N collisions at once: N ports in CLOSE_WAIT first, then all reconnect as fast as possible "
                        "(--ports, --rate, --duration and --count do not apply)")
    p.add_argument("--burst-pause", type=float, default=1.0,
                   help="--burst: seconds between the N sockets in CLOSE_WAIT and the burst")
    return p


if __name__ == "__main__":
    sys.exit(run(parser().parse_args()))
