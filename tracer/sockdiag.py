"""TCP sockets as the kernel lists them (what `ss` shows), through sock_diag.

One NETLINK_SOCK_DIAG dump per network namespace and address family
(inet_diag, the interface `ss` uses), with tcp_info for the age estimate. A
netlink socket belongs to the namespace it was created in, so each dump opens
its socket from a short-lived thread that has joined the namespace (setns(2)
changes only the calling thread): the tracer's own threads never move.

For a listener the kernel reports its accept-queue length as the receive
queue and its limit as the send queue (what `ss` prints as Recv-Q / Send-Q).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
INET_DIAG_INFO = 2
CLONE_NEWNET = 0x40000000

# The TCP state numbers of the inet_diag ABI (include/net/tcp_states.h; the
# state filter is a bit mask over them, so they are ABI, like AF_INET).
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
STATE_BITS = {name: 1 << num for num, name in TCP_STATES.items()}
ALL_STATES = 0xFFFFFFFF

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48s")  # struct inet_diag_req_v2
_MSG = struct.Struct("=BBBB48sIIIII")  # struct inet_diag_msg
_SOCKID = struct.Struct(">HH16s16sIQ")  # struct inet_diag_sockid (ports and addresses in network order)
_TCPI_LAST_ACK_RECV = 56  # struct tcp_info: tcpi_last_ack_recv (ms since the last ACK received)


class SockDiagError(Exception):
    """A namespace could not be listed."""


@dataclass(frozen=True)
class Sock:
    netns: int
    family: str  # "ipv4" / "ipv6"
    state: str  # "CLOSE_WAIT", "LISTEN", ...
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int  # 0: no struct socket (never accept()ed, or already closed by its process)
    recv_q: int  # LISTEN: accept-queue length; else rcv_nxt - copied_seq (a received FIN counts 1)
    send_q: int  # LISTEN: accept-queue limit; else bytes not yet acknowledged
    uid: int
    last_ack_recv_ms: int | None  # ms since the socket last received an ACK (tcp_info)

    @property
    def local(self) -> str:
        return _endpoint(self.family, self.laddr, self.lport)

    @property
    def remote(self) -> str:
        return _endpoint(self.family, self.raddr, self.rport)

    @property
    def unread_bytes(self) -> int:
        """Data received and never read by the application. Once the peer's
        FIN has arrived the receive queue counts it as one more byte."""
        fin = 1 if self.state in ("CLOSE_WAIT", "LAST_ACK", "CLOSING") else 0
        return max(self.recv_q - fin, 0)


def _endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _request(family: int, states: int, seq: int) -> bytes:
    req = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), states, bytes(48))
    return _NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req


def parse_message(netns: int, payload: bytes) -> Sock:
    """One inet_diag_msg with its attributes (the part after nlmsghdr)."""
    fam, state, _timer, _retrans, sockid, _expires, rq, wq, uid, inode = _MSG.unpack_from(payload)
    sport, dport, src, dst, _ifindex, _cookie = _SOCKID.unpack(sockid)
    if fam == socket.AF_INET:
        family, laddr, raddr = "ipv4", str(ipaddress.IPv4Address(src[:4])), str(ipaddress.IPv4Address(dst[:4]))
    else:
        family, laddr, raddr = "ipv6", str(ipaddress.IPv6Address(src)), str(ipaddress.IPv6Address(dst))
    last_ack = None
    off = _MSG.size
    while off + 4 <= len(payload):
        alen, atype = struct.unpack_from("=HH", payload, off)
        if alen < 4:
            break
        if atype == INET_DIAG_INFO and alen >= 4 + _TCPI_LAST_ACK_RECV + 4:
            (last_ack,) = struct.unpack_from("=I", payload, off + 4 + _TCPI_LAST_ACK_RECV)
        off += (alen + 3) & ~3
    return Sock(netns, family, TCP_STATES.get(state, str(state)), laddr, sport, raddr, dport, inode, rq, wq, uid,
                last_ack)


def _dump(sock: socket.socket, netns: int, family: int, states: int) -> list[Sock]:
    sock.send(_request(family, states, 1))
    out: list[Sock] = []
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return out
            body = data[off + _NLMSG.size:off + length]
            if mtype == NLMSG_DONE:
                return out
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", body)
                if err == -errno.ENOENT or err == -errno.EAFNOSUPPORT:  # no IPv6 in this namespace
                    return out
                raise SockDiagError(f"sock_diag: {os.strerror(-err)}")
            if mtype == SOCK_DIAG_BY_FAMILY:
                out.append(parse_message(netns, body))
            off += (length + 3) & ~3


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def in_netns(ns_path: str, fn):
    """fn(), run by a short-lived thread that joined the namespace at ns_path."""
    result: list = []

    def work():
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=work, name="sockdiag-setns")
    t.start()
    t.join()
    if isinstance(result[0], OSError):
        raise SockDiagError(f"network namespace {ns_path}: {result[0].strerror}")
    return result[0]


def _diag_socket_in(ns_path: str) -> socket.socket:
    """A sock_diag netlink socket living in the namespace at ns_path."""
    return in_netns(ns_path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG))


def listen_overflows(ns_path: str) -> int | None:
    """The namespace's TcpExtListenOverflows counter: SYNs and handshakes
    dropped because a listener's accept queue was full (what `nstat` shows)."""

    def read() -> str:
        with open("/proc/thread-self/net/netstat") as f:  # the calling thread's namespace
            return f.read()

    lines = [line.split() for line in in_netns(ns_path, read).splitlines()]
    for names, values in zip(lines[::2], lines[1::2]):
        if names and names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return None


def namespaces() -> dict[int, str]:
    """Every network namespace reachable now: inode -> a path to it (a process's
    /proc/PID/ns/net, or a bind mount under /run/netns)."""
    found: dict[int, str] = {}
    # our own first: always enterable (another process's may not be, e.g. in a container)
    candidates = ["/proc/self/ns/net"] + [f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit()]
    run = Path("/run/netns")
    if run.is_dir():
        candidates += [str(p) for p in run.iterdir()]
    for path in candidates:
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue  # the process is gone, or not ours to see
        found.setdefault(ino, path)
    return found


def list_sockets(states: int = ALL_STATES, netns: int | None = None, families: tuple[str, ...] = ("ipv4", "ipv6"),
                 ns_paths: dict[int, str] | None = None) -> list[Sock]:
    """TCP sockets in the given states, in one namespace or all of them.
    Namespaces that vanish meanwhile are skipped."""
    paths = ns_paths if ns_paths is not None else namespaces()
    if netns is not None:
        paths = {netns: paths[netns]} if netns in paths else {}
    out: list[Sock] = []
    for ino, path in sorted(paths.items()):
        try:
            sock = _diag_socket_in(path)
        except SockDiagError:
            continue
        with sock:
            for fam in families:
                out += _dump(sock, ino, socket.AF_INET if fam == "ipv4" else socket.AF_INET6, states)
    return out
