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

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
INET_DIAG_INFO = 2
INET_DIAG_REQ_BYTECODE = 1  # request attribute: a filter program the kernel runs on each socket
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3  # filter ops (ABI, linux/inet_diag.h): local port >= / <= the next op's `no`
INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE = 4, 5  # the same for the remote port
CLONE_NEWNET = 0x40000000

# The TCP state numbers of the inet_diag ABI (include/net/tcp_states.h; the
# state filter is a bit mask over them, so they are ABI, like AF_INET).
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
STATE_BITS = {name: 1 << num for num, name in TCP_STATES.items()}
_LISTEN = next(num for num, name in TCP_STATES.items() if name == "LISTEN")
ALL_STATES = 0xFFFFFFFF

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48s")  # struct inet_diag_req_v2
_MSG = struct.Struct("=BBBB48sIIIII")  # struct inet_diag_msg
_SOCKID = struct.Struct(">HH16s16sIQ")  # struct inet_diag_sockid (ports and addresses in network order)
_TCPI_LAST_ACK_RECV = 56  # struct tcp_info: tcpi_last_ack_recv (ms since the last ACK received)
_BC_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes (bytes to skip if true), no (if false)
_NLATTR = struct.Struct("=HH")
_MSG_STATE, _MSG_INODE = 1, 68  # offsets in struct inet_diag_msg


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


def _port_filter(port: int, remote: bool = False) -> bytes:
    """inet_diag bytecode keeping the sockets whose local (remote) port is
    `port` (S_GE and S_LE, D_GE and D_LE: on every kernel since 2.6; a failed
    test jumps past the end, which rejects the socket)."""
    ge, le = (INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE) if remote else (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE)
    return (_BC_OP.pack(ge, 8, 20) + _BC_OP.pack(0, 0, port)
            + _BC_OP.pack(le, 8, 12) + _BC_OP.pack(0, 0, port))


def _request(family: int, states: int, seq: int, info: bool = True, port: int | None = None,
             remote: bool = False) -> bytes:
    req = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1) if info else 0, states, bytes(48))
    if port is not None:
        bc = _port_filter(port, remote)
        req += _NLATTR.pack(_NLATTR.size + len(bc), INET_DIAG_REQ_BYTECODE) + bc
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


def _dump(sock: socket.socket, netns: int, family: int, states: int, info: bool = True, port: int | None = None,
          unaccepted: bool = False, remote: bool = False) -> list[Sock]:
    """One sock_diag dump. `port`: only sockets with that local port (filtered
    by the kernel); `unaccepted`: of the non-listening ones, only those no
    process holds yet (no inode: queued on their listener), skipped before
    they are parsed (a leaking server may hold 100,000 accepted ones);
    `remote`: `port` is the remote port."""
    sock.send(_request(family, states, 1, info, port, remote))
    out: list[Sock] = []
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return out
            body = off + _NLMSG.size
            if mtype == NLMSG_DONE:
                return out
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, body)
                if err == -errno.ENOENT or err == -errno.EAFNOSUPPORT:  # no IPv6 in this namespace
                    return out
                raise SockDiagError(f"sock_diag: {os.strerror(-err)}")
            if mtype == SOCK_DIAG_BY_FAMILY and not (
                    unaccepted and length >= _NLMSG.size + _MSG.size
                    and data[body + _MSG_STATE] != _LISTEN and struct.unpack_from("=I", data, body + _MSG_INODE)[0]):
                out.append(parse_message(netns, data[body:off + length]))
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


def port_states(netns: int, ns_path: str, port: int, pool: Pool | None = None,
                remote: bool = False) -> dict[tuple[str, str], list[str]]:
    """The states of the sockets in a namespace with local (`remote`: remote)
    port `port`, of any state, TIME_WAIT included, by (local, remote)
    endpoint ("10.0.0.1:80", "[::1]:80"): filtered by port in the kernel,
    without tcp_info."""
    out: dict[tuple[str, str], list[str]] = {}
    with (pool if pool is not None else Pool.once()).socket(netns, ns_path) as sock:
        for fam in (socket.AF_INET, socket.AF_INET6):
            for s in _dump(sock, netns, fam, ALL_STATES, info=False, port=port, remote=remote):
                out.setdefault((s.local, s.remote), []).append(s.state)
    return out


def queue_sockets(netns: int, ns_path: str, port: int, states: int, pool: Pool | None = None) -> list[Sock]:
    """What a listener's accept queue is made of, cheaply: the sockets in
    `states` with local port `port` (filtered in the kernel, without
    tcp_info), listeners and the children no process has accepted yet only.
    The work does not grow with the accepted sockets a leaking server holds."""
    with (pool if pool is not None else Pool.once()).socket(netns, ns_path) as sock:
        return [s for fam in (socket.AF_INET, socket.AF_INET6)
                for s in _dump(sock, netns, fam, states, info=False, port=port, unaccepted=True)]


class Pool:
    """sock_diag sockets kept open per network namespace, so that a storm's
    queries do not each start a thread to join the namespace. An open socket
    holds its namespace alive: each is closed once unused for IDLE_S
    (close_idle(), called by its owner now and then) and at close(). A
    failed dump closes the socket it used (the next query opens a new one)."""

    IDLE_S = 2.0

    def __init__(self, keep: bool = True, opener=None):
        self.keep = keep
        self.opener = opener or _diag_socket_in  # another netlink family's (tracer/host/conntrack.py)
        self._open: dict[int, tuple[socket.socket, float]] = {}

    @classmethod
    def once(cls) -> Pool:
        """A pool that keeps nothing: one socket per query."""
        return cls(keep=False)

    @contextlib.contextmanager
    def socket(self, netns: int, ns_path: str):
        held = self._open.pop(netns, None)
        sock = held[0] if held is not None else self.opener(ns_path)
        try:
            yield sock
        except BaseException:
            sock.close()
            raise
        if self.keep:
            self._open[netns] = (sock, time.monotonic())
        else:
            sock.close()

    def close_idle(self) -> None:
        now = time.monotonic()
        for netns, (sock, used) in list(self._open.items()):
            if now - used >= self.IDLE_S:
                del self._open[netns]
                sock.close()

    def close(self) -> None:
        for sock, _ in self._open.values():
            sock.close()
        self._open.clear()
