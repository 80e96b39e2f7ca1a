"""The seed's experiment 1, with real sockets: a port collision on purpose.

1. a listener that never calls accept();
2. a client connects from a fixed port and closes: the server's end of that
   connection goes to CLOSE_WAIT and stays there (nobody will close it);
3. once the client's FIN-WAIT-2 has expired, a new client connects from the
   same port: its SYN hits the CLOSE_WAIT socket.

Run as `python -m tracer.scenario ...` (tcpcollide-trace demo and the live
tests do). It prints one JSON line per step on stdout; the last one carries
the new connection's connect() latency as the client measured it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from tracer import netns

TCP_REPAIR = 19  # linux/tcp.h


def say(step: str, **kw) -> None:
    print(json.dumps({"step": step, **kw}), flush=True)


def run(args: argparse.Namespace) -> int:
    fam = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    if args.server_ns:
        netns.enter(args.server_ns)
    listener = socket.socket(socket.AF_INET6 if ":" in (args.listen_ip or args.server_ip) else fam)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.listen_ip or args.server_ip, args.server_port))
    listener.listen(args.backlog)
    say("listen", addr=f"{args.server_ip}:{args.server_port}", note="never calls accept()")
    if args.client_ns:
        netns.enter(args.client_ns)
    first = socket.socket(fam, socket.SOCK_STREAM)
    first.bind((args.client_ip, args.client_port))
    first.connect((args.server_ip, args.server_port))
    if args.fast:
        # FIN, then drop the client socket silently: in TCP_REPAIR mode close()
        # sends nothing (tcp_disconnect), so the port is free at once while the
        # server's end stays in CLOSE_WAIT (the seed waits for FIN-WAIT-2 instead)
        first.shutdown(socket.SHUT_WR)
        time.sleep(0.02)
        first.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    first.close()
    say("first_close", client_port=args.client_port, note="server end now in CLOSE_WAIT")
    deadline = time.monotonic() + args.port_wait
    while True:
        second = socket.socket(fam, socket.SOCK_STREAM)
        try:
            second.bind((args.client_ip, args.client_port))
            break
        except OSError:
            second.close()
            if time.monotonic() > deadline:
                say("error", note=f"port {args.client_port} still busy after {args.port_wait} s")
                return 1
            time.sleep(0.05)
    say("port_free", note="the client's FIN-WAIT-2 expired; the CLOSE_WAIT socket still holds the tuple")
    if args.wait_stdin:
        say("waiting", note="reconnects when a line arrives on stdin")
        sys.stdin.readline()
    second.settimeout(args.connect_timeout)
    t0 = time.monotonic()
    try:
        second.connect((args.server_ip, args.server_port))
    except OSError as e:
        say("connect_failed", error=str(e), connect_ms=round((time.monotonic() - t0) * 1e3, 3))
        return 2
    say("connected", connect_ms=round((time.monotonic() - t0) * 1e3, 3))
    time.sleep(args.hold)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracer.scenario", description=__doc__.split("\n")[0])
    p.add_argument("--server-ns", default="")
    p.add_argument("--client-ns", default="")
    p.add_argument("--server-ip", default="127.0.0.1", help="the address clients connect to")
    p.add_argument("--listen-ip", default="", help="the listener's address (default: --server-ip; '::' for dual-stack)")
    p.add_argument("--client-ip", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=12345)
    p.add_argument("--client-port", type=int, default=39836)
    p.add_argument("--backlog", type=int, default=8)
    p.add_argument("--port-wait", type=float, default=10.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--fast", action="store_true",
                   help="free the client port at once (TCP_REPAIR) instead of waiting for FIN-WAIT-2 to expire")
    p.add_argument("--wait-stdin", action="store_true", help="pause before the reconnect until a line is read")
    p.add_argument("--hold", type=float, default=1.0, help="seconds to keep the sockets open at the end")
    return p


if __name__ == "__main__":
    sys.exit(run(parser().parse_args()))
