"""What conntrack knows about a translated connection, asked through
ctnetlink (NETLINK_NETFILTER, the interface of `conntrack -G`) in the network
namespace that translates it.

Why ctnetlink and not the kernel's hooks: the translation is made in a
namespace of its own (a router, a Docker host's or a Kubernetes node's root
namespace), and a packet that crosses a veth into the server's or the
client's namespace loses its conntrack entry on the way (skb_scrub_packet()
calls nf_reset_ct()): no hook of the tracer (all on the ends' sockets) holds
the entry. Hooks on the translator's own packets would run for every packet
the host forwards. ctnetlink answers one question per namespace, in tens of
microseconds, only for the collisions that ended.

An entry's tuples: ORIGINAL is the connection as its initiator (the client)
sent it, REPLY as the answers come back (from the server's end), so the
client's tuple is the ORIGINAL one and the server's is the REPLY one,
reversed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time

from tracer.host import sockdiag
from tracer.pipeline.events import AF_INET, AF_INET6, format_addr

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET = 1, 1  # linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
NLM_F_REQUEST, NLMSG_ERROR, NLA_F_NESTED = 1, 2, 0x8000
# enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto, ctattr_protoinfo(_tcp)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT, CTA_MARK, CTA_ID, CTA_ZONE = (
    1, 2, 3, 4, 7, 8, 12, 18)
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
# enum ip_conntrack_status bits
STATUS_BITS = {0: "expected", 1: "seen_reply", 2: "assured", 3: "confirmed", 4: "src_nat", 5: "dst_nat",
               6: "seq_adjust", 9: "dying", 12: "untracked", 14: "offload"}
# enum tcp_conntrack
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
              "CLOSE", "SYN_SENT2")
# the namespace's sysctls that decide how long conntrack remembers a closing connection's mapping
TIMEOUTS = ("established", "fin_wait", "close_wait", "last_ack", "time_wait", "close")


ANSWER_S = 3.0  # the longest wait for ctnetlink's answer (the first question may load nf_conntrack_netlink)
LOADED = "/sys/module/nf_conntrack"  # conntrack is in this kernel (built in, or its module loaded)


class ConntrackError(Exception):
    pass


def present() -> bool:
    """Whether this kernel tracks connections at all: without conntrack, no
    namespace can translate one (and asking ctnetlink would load it)."""
    return os.path.exists(LOADED)


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _tuple_attr(kind: int, family: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    v6 = family == socket.AF_INET6
    ips = (_attr(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, ipaddress.ip_address(src).packed)
           + _attr(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, ipaddress.ip_address(dst).packed))
    proto = (_attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])) + _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", sport))
             + _attr(CTA_PROTO_DST_PORT, struct.pack(">H", dport)))
    return _attr(kind | NLA_F_NESTED, _attr(CTA_TUPLE_IP | NLA_F_NESTED, ips)
                 + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))


def get_request(family: int, direction: str, src: str, sport: int, dst: str, dport: int, seq: int = 1) -> bytes:
    """IPCTNL_MSG_CT_GET for the entry with this ORIGINAL ("original") or
    REPLY ("reply") tuple."""
    kind = CTA_TUPLE_ORIG if direction == "original" else CTA_TUPLE_REPLY
    body = struct.pack("=BBH", family, 0, 0) + _tuple_attr(kind, family, src, sport, dst, dport)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def _endpoints(data: bytes) -> dict:
    t = _attrs(data)
    ips, proto = _attrs(t.get(CTA_TUPLE_IP, b"")), _attrs(t.get(CTA_TUPLE_PROTO, b""))
    src = ips.get(CTA_IP_V4_SRC) or ips.get(CTA_IP_V6_SRC)
    dst = ips.get(CTA_IP_V4_DST) or ips.get(CTA_IP_V6_DST)
    sport = struct.unpack(">H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else None
    dport = struct.unpack(">H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else None
    return {"src": _endpoint(src, sport), "dst": _endpoint(dst, dport)}


def _endpoint(addr: bytes | None, port: int | None) -> str | None:
    if addr is None or port is None:
        return None
    return format_addr(AF_INET6 if len(addr) == 16 else AF_INET, addr, port)


def parse_entry(payload: bytes) -> dict:
    """A ctnetlink conntrack message's body (after struct nfgenmsg) as a dict."""
    a = _attrs(payload)
    status = struct.unpack(">I", a[CTA_STATUS])[0] if CTA_STATUS in a else 0
    state = None
    if CTA_PROTOINFO in a:
        tcp = _attrs(_attrs(a[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP, b""))
        if CTA_PROTOINFO_TCP_STATE in tcp:
            num = tcp[CTA_PROTOINFO_TCP_STATE][0]
            state = TCP_STATES[num] if num < len(TCP_STATES) else str(num)
    return {
        "original": _endpoints(a.get(CTA_TUPLE_ORIG, b"")),
        "reply": _endpoints(a.get(CTA_TUPLE_REPLY, b"")),
        "status": [name for bit, name in STATUS_BITS.items() if status & (1 << bit)],
        "tcp_state": state,
        "timeout_s": struct.unpack(">I", a[CTA_TIMEOUT])[0] if CTA_TIMEOUT in a else None,
        "mark": struct.unpack(">I", a[CTA_MARK])[0] if CTA_MARK in a else 0,
        "zone": struct.unpack(">H", a[CTA_ZONE])[0] if CTA_ZONE in a else 0,
        "id": struct.unpack(">I", a[CTA_ID])[0] if CTA_ID in a else None,
    }


def _socket_in(ns_path: str) -> socket.socket:
    def open_() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.settimeout(ANSWER_S)
        return s
    return sockdiag.in_netns(ns_path, open_)


def ask(sock: socket.socket, request: bytes) -> dict | None:
    """Send one GET; the entry, or None (ENOENT: conntrack has no such entry)."""
    sock.send(request)
    data = sock.recv(65536)
    length, msg_type = struct.unpack_from("=IH", data, 0)
    if msg_type == NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, 16)[0]
        if err in (0, errno.ENOENT):
            return None
        raise ConntrackError(os.strerror(err))
    return parse_entry(data[20:length])


def forwarding(ns_path: str) -> bool:
    """net.ipv4.ip_forward or net.ipv6.conf.all.forwarding in the namespace
    (true when it cannot be read: ask it rather than miss a translator)."""
    def read() -> bool:
        for name in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            try:
                with open(f"/proc/sys/net/{name}") as f:
                    if f.read().strip() not in ("", "0"):
                        return True
            except OSError:
                continue
        return False
    try:
        return sockdiag.in_netns(ns_path, read)
    except sockdiag.SockDiagError:
        return True


def timeouts(ns_path: str) -> dict[str, int] | None:
    """The namespace's conntrack TCP timeouts (seconds), None without conntrack there."""
    def read() -> dict[str, int] | None:
        out = {}
        for name in TIMEOUTS:
            try:
                with open(f"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_{name}") as f:
                    out[name] = int(f.read())
            except OSError:
                return None
        return out
    try:
        return sockdiag.in_netns(ns_path, read)
    except sockdiag.SockDiagError:
        return None


class Conntrack:
    """Finds a connection's conntrack entry in the host's namespaces that can
    hold it (the ends' own, the root one, and those that forward packets),
    within a budget of questions per second (BUDGET: a storm's thousands of
    collisions on a node with many forwarding namespaces would otherwise ask
    hundreds of thousands; a collision not looked for says so, `budget`)."""

    BUDGET = 2000  # namespace questions per second
    MAX_NAMESPACES = 256  # asked per collision at most (the ends' own first, then the host's, then the forwarding)
    TTL_S = 10.0  # a namespace's forwarding and timeouts sysctls are read again after this long

    def __init__(self):
        self.pool = sockdiag.Pool(opener=_socket_in)
        self._tokens = float(self.BUDGET)
        self._refilled = time.monotonic()
        self._timeouts: dict[int, tuple[float, dict | None]] = {}
        self._forwarding: dict[int, tuple[float, bool]] = {}

    def _spend(self, n: int) -> bool:
        now = time.monotonic()
        self._tokens = min(self.BUDGET, self._tokens + (now - self._refilled) * self.BUDGET)
        self._refilled = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    def _sysctls(self, table: dict, ns: int, path: str, read):
        """read(path) for namespace `ns`, kept TTL_S in `table`."""
        now = time.monotonic()
        held = table.get(ns)
        if held is None or now - held[0] > self.TTL_S:
            held = table[ns] = (now, read(path))
        return held[1]

    def _forwards(self, ns: int, path: str) -> bool:
        """Whether the namespace forwards packets (IPv4 or IPv6): a translator
        between two other namespaces or hosts does (a router, a Docker host, a
        node); a pod's or a container's own namespace does not."""
        return self._sysctls(self._forwarding, ns, path, forwarding)

    def find(self, family: int, direction: str, src: str, sport: int, dst: str, dport: int,
             ns_paths: dict[int, str], first: list[int]) -> dict:
        """{"entry": ..., "netns": N, "timeouts": {...}} where found, else
        {"entry": None, "unknown": why}: "not_found" (no namespace of this
        host translates it: the translator is elsewhere, or forgot it),
        "budget" (not asked), "unavailable" (ctnetlink cannot be used here)."""
        if not present():
            return {"entry": None, "unknown": "not_found"}
        # the ends' own namespaces (a REDIRECT or DNAT on their own output), the host's, then the
        # other namespaces that forward packets (only they can translate between two others)
        order = [ns for ns in first if ns in ns_paths]
        for path in ("/proc/self/ns/net", "/proc/1/ns/net"):  # the tracer's (host network) and init's
            try:
                root = os.stat(path).st_ino
            except OSError:
                continue
            if root in ns_paths and root not in order:
                order.append(root)
        order += [ns for ns in sorted(ns_paths) if ns not in order and self._forwards(ns, ns_paths[ns])]
        order = order[:self.MAX_NAMESPACES]
        if not self._spend(len(order)):
            return {"entry": None, "unknown": "budget"}
        request = get_request(family, direction, src, sport, dst, dport)
        errors = 0
        for ns in order:
            try:
                with self.pool.socket(ns, ns_paths[ns]) as sock:
                    entry = ask(sock, request)
            except (OSError, sockdiag.SockDiagError, ConntrackError, struct.error):
                errors += 1
                continue
            if entry is not None and ("src_nat" in entry["status"] or "dst_nat" in entry["status"]):
                return {"entry": entry, "netns": ns, "timeouts": self._netns_timeouts(ns, ns_paths[ns])}
        return {"entry": None, "unknown": "unavailable" if errors == len(order) else "not_found"}

    def _netns_timeouts(self, ns: int, path: str) -> dict | None:
        return self._sysctls(self._timeouts, ns, path, timeouts)

    def close_idle(self) -> None:
        self.pool.close_idle()

    def close(self) -> None:
        self.pool.close()


def probe() -> str | None:
    """Whether conntrack can be asked here (None) or why not: doctor's line,
    and the tracer's start (where it loads nf_conntrack_netlink, if it is a
    module, once rather than at the first collision)."""
    if not present():
        return "no conntrack in this kernel (nf_conntrack not loaded): no namespace here translates connections"
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        return f"no NETLINK_NETFILTER socket ({e.strerror})"
    try:
        sock.settimeout(ANSWER_S)
        ask(sock, get_request(socket.AF_INET, "original", "192.0.2.1", 1, "192.0.2.2", 1))
    except (OSError, ConntrackError) as e:
        return f"ctnetlink does not answer ({e})"
    finally:
        sock.close()
    return None
