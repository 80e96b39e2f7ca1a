"""The first experiment of the original write-up ("When a new connection's source port collides with a port held by a CLOSE_WAIT socket",
当新连接源端口和 CLOSE_WAIT 状态占用端口发生碰撞时), with real sockets: a port collision on purpose.

1. a listener that never calls accept();
2. a client connects from a fixed port and closes: the server's end of that
   connection goes to CLOSE_WAIT and stays there (nobody will close it);
3. once the client's FIN-WAIT-2 has expired, a new client connects from the
   same port: its SYN hits the CLOSE_WAIT socket.

With --accept, a separate server process (named by --server-comm) accepts
every connection and holds it without ever closing it, as a leaking
application does (or, with --close-on-eof, closes it when the peer does).
--unread leaves bytes unread in the server's socket; --rounds repeats the
collision on the same port pair.

Run as `python -m tracer.host.scenario ...` (tcpcollide-trace demo and the live
tests do). It prints one JSON line per step on stdout; the last one carries
the new connection's connect() latency as the client measured it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time

from tracer.host import netns

TCP_LINGER2, TCP_INFO, TCP_REPAIR = 8, 11, 19  # linux/tcp.h
TCP_FIN_WAIT2 = 5  # include/net/tcp_states.h (struct tcp_info's first byte)
PR_SET_NAME, PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 15, 1, 4  # linux/prctl.h


def say(step: str, **kw) -> None:
    # one write(2) per line: the server process (--accept) shares this pipe
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps({"step": step, **kw}) + "\n").encode())


def serve(listener: socket.socket, comm: str, close_on_eof: bool, user: int | None = None) -> None:
    """The leaking server (a child process): accept everything, never read,
    never close (or close on EOF, which needs a read). `user`: it runs as
    this uid (and gid), as a service's unprivileged server would."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_NAME, comm.encode()[:15])
    if user is not None:
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
        libc.prctl(PR_SET_DUMPABLE, 1)  # its /proc/PID is its own, as an exec'd server's is
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the change of credentials
    held = []
    while True:
        conn, peer = listener.accept()
        held.append(conn)
        say("accepted", pid=os.getpid(), comm=comm, fd=conn.fileno(), peer=f"{peer[0]}:{peer[1]}")
        if close_on_eof:
            conn.settimeout(30)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            conn.close()
            say("server_closed", note="closed after the peer's FIN")


def listen(addr: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on addr:port (IPv6 when addr has a colon)."""
    listener = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(backlog)
    return listener


@contextlib.contextmanager
def forked(fn, *args):
    """fn(*args) in a child process (a leaking server); yields its pid, and
    kills and reaps it on the way out."""
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def connect_once(args, fam: int, first: bool, ip: str | None = None, port: int | None = None
                 ) -> socket.socket | None:
    """A client socket bound to the fixed port (once it is free). Its
    FIN-WAIT-2 lasts --fin-timeout seconds (TCP_LINGER2: the socket's own
    tcp_fin_timeout, so no sysctl is needed: /proc/sys is read-only in a
    container)."""
    deadline = time.monotonic() + args.port_wait
    while True:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, TCP_LINGER2, args.fin_timeout)
        try:
            s.bind((ip or args.client_ip, port or args.client_port))
            return s
        except OSError:
            s.close()
            if first or time.monotonic() > deadline:
                say("error", note=f"port {port or args.client_port} still busy after {args.port_wait} s")
                return None
            time.sleep(0.05)


def wait_fin_acked(s: socket.socket, limit: float) -> None:
    """Until the server has acknowledged our FIN (we are in FIN-WAIT-2: its
    end is in CLOSE_WAIT), at most `limit` seconds. On loopback that is at
    once, unless softirqs are deferred on a loaded host; dropping the socket
    before would have the server's ACK answered with a RST, and no collision."""
    deadline = time.monotonic() + limit
    while s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] != TCP_FIN_WAIT2 and time.monotonic() < deadline:
        time.sleep(0.001)


def hang_up(args, s: socket.socket) -> None:
    """Close our end: the server's end goes to CLOSE_WAIT."""
    if args.unread:
        s.sendall(b"x" * args.unread)
    if args.fast:
        # FIN, then drop the client socket silently: in TCP_REPAIR mode close()
        # sends nothing (tcp_disconnect), so the port is free at once while the
        # server's end stays in CLOSE_WAIT (the write-up waits for FIN-WAIT-2 to expire instead)
        s.shutdown(socket.SHUT_WR)
        wait_fin_acked(s, args.settle)
        time.sleep(args.age)
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    s.close()


def run(args: argparse.Namespace) -> int:
    fam = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    if args.server_ns:
        netns.enter(args.server_ns)
    if args.external_server:
        say("listen", addr=f"{args.server_ip}:{args.server_port}", note="another program's server")
        return clients(args, fam)
    listener = listen(args.listen_ip or args.server_ip, args.listen_port or args.server_port, args.backlog)
    with contextlib.ExitStack() as stack:
        if args.accept:
            server_pid = stack.enter_context(forked(serve, listener, args.server_comm, args.close_on_eof,
                                                    args.server_user))
            say("listen", addr=f"{args.server_ip}:{args.server_port}", server_pid=server_pid,
                note="a server process accepts and never closes")
        else:
            say("listen", addr=f"{args.server_ip}:{args.server_port}", pid=os.getpid(), fd=listener.fileno(),
                note="never calls accept()")
        return clients(args, fam)


def clients(args: argparse.Namespace, fam: int) -> int:
    if args.client_ns:
        netns.enter(args.client_ns)
    conn = connect_once(args, fam, True)
    if conn is None:
        return 1
    conn.connect((args.server_ip, args.server_port))
    for n in range(1, args.rounds + 1):
        time.sleep(args.before_close)
        hang_up(args, conn)
        say("first_close" if n == 1 else "close", client_port=args.client_port, note="server end now in CLOSE_WAIT")
        if args.reconnect_after:
            time.sleep(args.reconnect_after)
        conn = connect_once(args, fam, False, args.second_ip or args.client_ip, args.second_port or args.client_port)
        if conn is None:
            return 1
        say("port_free", note="the client's FIN-WAIT-2 expired; the CLOSE_WAIT socket still holds the tuple")
        if args.wait_stdin:
            say("waiting", note="reconnects when a line arrives on stdin")
            sys.stdin.readline()
        conn.settimeout(args.connect_timeout)
        t0 = time.monotonic()
        try:
            conn.connect((args.server_ip, args.server_port))
        except OSError as e:
            say("connect_failed", error=str(e), connect_ms=round((time.monotonic() - t0) * 1e3, 3))
            return 2
        say("connected", connect_ms=round((time.monotonic() - t0) * 1e3, 3), round=n)
    time.sleep(args.hold)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracer.host.scenario", description=__doc__.split("\n")[0])
    p.add_argument("--server-ns", default="")
    p.add_argument("--client-ns", default="")
    p.add_argument("--server-ip", default="127.0.0.1", help="the address clients connect to")
    p.add_argument("--listen-ip", default="", help="the listener's address (default: --server-ip; '::' for dual-stack)")
    p.add_argument("--listen-port", type=int, default=0,
                   help="the listener's port (default: --server-port; another one behind a DNAT)")
    p.add_argument("--client-ip", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=12345)
    p.add_argument("--client-port", type=int, default=39836)
    p.add_argument("--second-ip", default="",
                   help="the reconnecting client's address (default: --client-ip): another host behind the same NAT")
    p.add_argument("--second-port", type=int, default=0,
                   help="the reconnecting client's port (default: --client-port): a NAT maps it onto the freed one")
    p.add_argument("--reconnect-after", type=float, default=0.0,
                   help="seconds to wait before reconnecting (a NAT's conntrack entry of the first connection expires)")
    p.add_argument("--backlog", type=int, default=8)
    p.add_argument("--port-wait", type=float, default=10.0)
    p.add_argument("--fin-timeout", type=int, default=1,
                   help="seconds the client's FIN-WAIT-2 lasts (TCP_LINGER2), after which the port is free")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--fast", action="store_true",
                   help="free the client port at once (TCP_REPAIR) instead of waiting for FIN-WAIT-2 to expire")
    p.add_argument("--wait-stdin", action="store_true", help="pause before the reconnect until a line is read")
    p.add_argument("--hold", type=float, default=1.0, help="seconds to keep the sockets open at the end")
    p.add_argument("--accept", action="store_true", help="a server process accepts and holds every connection")
    p.add_argument("--external-server", action="store_true",
                   help="the server is another program's (a container's), already listening: clients only")
    p.add_argument("--server-comm", default="leakysrv", help="the server process's name (with --accept)")
    p.add_argument("--server-user", type=int, default=None, metavar="UID",
                   help="the server process runs as this uid and gid (with --accept)")
    p.add_argument("--close-on-eof", action="store_true", help="the server closes a connection when the peer does")
    p.add_argument("--unread", type=int, default=0, help="bytes the client sends and the server never reads")
    p.add_argument("--rounds", type=int, default=1, help="collide this many times on the same port pair")
    p.add_argument("--before-close", type=float, default=0.05, help="seconds between connecting and closing")
    p.add_argument("--settle", type=float, default=2.0,
                   help="with --fast: the longest wait, in seconds, for the server to acknowledge the client's FIN")
    p.add_argument("--age", type=float, default=0.05,
                   help="with --fast: seconds the server's end stays in CLOSE_WAIT before the port is reused")
    return p


if __name__ == "__main__":
    sys.exit(run(parser().parse_args()))
