"""Every kernel struct field and enum value the BPF programs use, in one list.

The BPF programs never include kernel struct definitions. They read fields
with `tc_read(dst, base, OFF_X)` and compare with `K_Y`, and this module
defines those macros for the running kernel:

- from BTF (`/sys/kernel/btf/vmlinux`, or a vmlinux ELF's `.BTF` section):
  numbers, and the program compiles against the small compat tree;
- from kernel headers, when there is no BTF: `offsetof()` expressions and the
  enumerator names themselves, and the program compiles against the headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tracer.kernel.btf import BTF, BTFError


@dataclass(frozen=True)
class Field:
    macro: str
    struct: str
    path: str
    size: int  # the size the C code reads; checked against the kernel's


FIELDS = [
    Field("OFF_SKC_FAMILY", "sock", "__sk_common.skc_family", 2),
    Field("OFF_SKC_STATE", "sock", "__sk_common.skc_state", 1),
    # not skc_num: tcp_set_state(TCP_CLOSE) zeroes it (inet_put_port) before
    # the state change is traced; inet_sport survives until the socket dies
    Field("OFF_INET_SPORT", "inet_sock", "inet_sport", 2),
    Field("OFF_SKC_DPORT", "sock", "__sk_common.skc_dport", 2),
    # a TIME_WAIT socket (struct inet_timewait_sock) is only sock_common: its
    # local port is skc_num, its old numbers tw_snd_nxt/tw_rcv_nxt live there
    Field("OFF_SKC_NUM", "sock", "__sk_common.skc_num", 2),
    Field("OFF_SKC_TW_SND_NXT", "sock", "__sk_common.skc_tw_snd_nxt", 4),
    Field("OFF_SKC_TW_RCV_NXT", "sock", "__sk_common.skc_tw_rcv_nxt", 4),
    Field("OFF_TW_LAST_OOW_ACK_TIME", "tcp_timewait_sock", "tw_last_oow_ack_time", 4),
    Field("OFF_SKC_RCV_SADDR", "sock", "__sk_common.skc_rcv_saddr", 4),
    Field("OFF_SKC_DADDR", "sock", "__sk_common.skc_daddr", 4),
    Field("OFF_SKC_V6_RCV_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16),
    Field("OFF_SKC_V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16),
    Field("OFF_SKC_NET", "sock", "__sk_common.skc_net", 8),
    Field("OFF_NET_NS_INUM", "net", "ns.inum", 4),
    Field("OFF_SK_SOCKET", "sock", "sk_socket", 8),
    Field("OFF_SK_PROTOCOL", "sock", "sk_protocol", 2),  # a u16 since Linux 5.6
    Field("OFF_SK_ACK_BACKLOG", "sock", "sk_ack_backlog", 4),
    Field("OFF_SK_MAX_ACK_BACKLOG", "sock", "sk_max_ack_backlog", 4),
    Field("OFF_TP_SND_NXT", "tcp_sock", "snd_nxt", 4),
    Field("OFF_TP_RCV_NXT", "tcp_sock", "rcv_nxt", 4),
    Field("OFF_TP_COPIED_SEQ", "tcp_sock", "copied_seq", 4),
    Field("OFF_TP_RCV_TSTAMP", "tcp_sock", "rcv_tstamp", 4),
    Field("OFF_TP_LAST_OOW_ACK_TIME", "tcp_sock", "last_oow_ack_time", 4),
    # segments the socket transmitted (__tcp_transmit_skb, since 4.6): the
    # challenge hook compares it before and after tcp_send_challenge_ack() to
    # know whether the ACK really went out, past every limiter
    Field("OFF_TP_SEGS_OUT", "tcp_sock", "segs_out", 4),
    # tcp_connect() stamps the SYN's send time here (tcp_time_stamp_ts(): ms, or
    # us with tp->tcp_usec_ts); the client's view measures its penalty from it
    Field("OFF_TP_RETRANS_STAMP", "tcp_sock", "retrans_stamp", 4),
    Field("OFF_SKB_HEAD", "sk_buff", "head", 8),
    Field("OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header", 2),
]

# From a `struct socket *` to its inode number: struct socket sits inside
# struct socket_alloc next to its inode (SOCK_INODE() in include/net/sock.h).
SOCKET_INODE = ("OFF_SOCKET_INODE_INO", "socket_alloc", "vfs_inode.i_ino", "socket")

# (macro, enumerator, enum type or None for anonymous enums)
ENUMS = [
    ("K_IPPROTO_TCP", "IPPROTO_TCP", None),
    ("K_TCP_ESTABLISHED", "TCP_ESTABLISHED", None),
    ("K_TCP_SYN_SENT", "TCP_SYN_SENT", None),
    ("K_TCP_SYN_RECV", "TCP_SYN_RECV", None),
    ("K_TCP_CLOSE", "TCP_CLOSE", None),
    ("K_TCP_CLOSE_WAIT", "TCP_CLOSE_WAIT", None),
    ("K_TCP_LISTEN", "TCP_LISTEN", None),
    ("K_TCP_LAST_ACK", "TCP_LAST_ACK", None),
    ("K_TCP_FIN_WAIT1", "TCP_FIN_WAIT1", None),
    ("K_TCP_FIN_WAIT2", "TCP_FIN_WAIT2", None),
    ("K_TCP_CLOSING", "TCP_CLOSING", None),
    ("K_TCP_TIME_WAIT", "TCP_TIME_WAIT", None),
    ("K_SKB_DROP_REASON_TCP_INVALID_SYN", "SKB_DROP_REASON_TCP_INVALID_SYN", "skb_drop_reason"),
]

# Enum values a kernel may lack, with the hook that needs them: where BTF has
# no such value the macro stays undefined, and hook selection never picks
# that hook there (tracer/kernel/hooks.py checks the tracepoint's fields,
# which come with the enum). Drop reasons exist since Linux 5.17; the
# skb:kfree_skb candidate needs rx_sk (6.11) as well.
OPTIONAL_ENUMS = {"K_SKB_DROP_REASON_TCP_INVALID_SYN": "skb:kfree_skb"}

# The TCP state names as the kernel numbers them (include/net/tcp_states.h);
# the numbers are read from the running kernel, these are only the names.
TCP_STATE_NAMES = [
    "TCP_ESTABLISHED", "TCP_SYN_SENT", "TCP_SYN_RECV", "TCP_FIN_WAIT1", "TCP_FIN_WAIT2",
    "TCP_TIME_WAIT", "TCP_CLOSE", "TCP_CLOSE_WAIT", "TCP_LAST_ACK", "TCP_LISTEN", "TCP_CLOSING",
    "TCP_NEW_SYN_RECV",
]


class OffsetError(Exception):
    """The running kernel lacks a field or enum value the tracer needs."""


def btf_defines(btf: BTF) -> dict[str, int]:
    """Macro values for every field and enum, read from BTF."""
    out: dict[str, int] = {}
    try:
        for f in FIELDS:
            size = btf.member_size(f.struct, f.path)
            if size != f.size:
                raise OffsetError(f"struct {f.struct}.{f.path} is {size} bytes on this kernel, the tracer reads {f.size}")
            out[f.macro] = btf.member_offset(f.struct, f.path)
        macro, struct, path, anchor = SOCKET_INODE
        out[macro] = btf.member_offset(struct, path) - btf.member_offset(struct, anchor)
        for macro, name, enum in ENUMS:
            try:
                out[macro] = btf.enum_value(name, enum)
            except BTFError:
                if macro not in OPTIONAL_ENUMS:
                    raise
    except BTFError as e:
        raise OffsetError(str(e)) from e
    out.update(usec_ts_defines(btf))
    return out


# Macros btf_defines() adds only where the kernel has the field (the BPF side
# has a fallback); header builds never define them.
OPTIONAL_MACROS = ("OFF_TP_USEC_TS", "TC_TP_USEC_TS_MASK")


def usec_ts_defines(btf: BTF) -> dict[str, int]:
    """tp->tcp_usec_ts (Linux >= 6.7: tp->retrans_stamp counts microseconds
    instead of milliseconds), a one-bit bitfield: the byte holding it and its
    mask (little endian: BTF bit offsets count from the byte's low bit). None
    on older kernels, and without BTF: milliseconds are assumed."""
    if not btf.has_member("tcp_sock", "tcp_usec_ts"):
        return {}
    bit = btf.member_bit_offset("tcp_sock", "tcp_usec_ts")
    return {"OFF_TP_USEC_TS": bit // 8, "TC_TP_USEC_TS_MASK": 1 << (bit % 8)}


def header_defines() -> dict[str, str]:
    """Macro values for compiling against real kernel headers (no BTF)."""
    out: dict[str, str] = {f.macro: f"__builtin_offsetof(struct {f.struct}, {f.path})" for f in FIELDS}
    macro, struct, path, anchor = SOCKET_INODE
    out[macro] = f"(__builtin_offsetof(struct {struct}, {path}) - __builtin_offsetof(struct {struct}, {anchor}))"
    for macro, name, _ in ENUMS:
        out[macro] = name
    return out


# What a program compiled against headers needs to see those names.
HEADER_INCLUDES = ["linux/skbuff.h", "linux/tcp.h", "net/sock.h", "net/net_namespace.h"]
# and where the kernel has it (Linux >= 6.0; before, drop reasons live in skbuff.h or nowhere)
HEADER_OPTIONAL_INCLUDES = ["net/dropreason.h"]


def tcp_states(btf: BTF) -> dict[int, str]:
    """Kernel TCP state number -> name (`ESTABLISHED`, `CLOSE_WAIT`, ...)."""
    states = {}
    for name in TCP_STATE_NAMES:
        try:
            states[btf.enum_value(name)] = name.removeprefix("TCP_")
        except BTFError:
            continue
    return states


def header_tcp_states(include_dirs: list[Path]) -> dict[int, str]:
    """The TCP state numbering from a header tree's net/tcp_states.h (an enum
    with implicit values: TCP_ESTABLISHED = 1, TCP_SYN_SENT, ...)."""
    paths = [Path(d) / "net" / "tcp_states.h" for d in include_dirs]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise OffsetError(f"no net/tcp_states.h under {', '.join(map(str, include_dirs)) or 'the kernel headers'}")
    text = path.read_text()
    m = re.search(r"enum\s*\{([^}]*TCP_ESTABLISHED[^}]*)\}", text)
    if not m:
        raise OffsetError(f"no TCP state enum in {path}")
    states, value = {}, -1
    for name, explicit in re.findall(r"\b(TCP_[A-Z0-9_]+)\s*(?:=\s*(\d+))?\s*,", m.group(1) + ","):
        value = int(explicit) if explicit else value + 1
        if name in TCP_STATE_NAMES:
            states[value] = name.removeprefix("TCP_")
    return states
