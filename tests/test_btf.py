"""Tests for tracer.kernel.btf, against the running kernel's BTF and synthetic blobs.

Reference values for the kernel these tests were written on (6.18.44, x86_64),
checked by hand with ``pahole -C <struct> /sys/kernel/btf/vmlinux`` (pahole
1.24).  They are deliberately NOT asserted, since other kernels differ:

    struct sock_common (size 136):
        skc_daddr 0, skc_rcv_saddr 4   (anonymous struct in anonymous union)
        skc_dport 12, skc_num 14       (anonymous struct in anonymous union)
        skc_family 16, skc_state 18, skc_reuse:4 at 19 (bitfield)
        skc_net 48 (possible_net_t, .net at 48), skc_v6_daddr 56
    struct sock (size 784): __sk_common 0, sk_userlocks 243 (plain u8 now)
    struct tcp_sock (size 2304): rcv_nxt 1664, snd_nxt 1668, repair:1 at 1463
    struct net: ns at 152; struct ns_common: inum at 24 -> net ns.inum = 176

When pahole is installed the per-member comparison test checks every member of
several structs against pahole's output on whatever kernel runs the tests.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracer.kernel.btf import BTF, BTFError  # noqa: E402

VMLINUX = "/sys/kernel/btf/vmlinux"

needs_vmlinux = pytest.mark.skipif(
    not os.access(VMLINUX, os.R_OK), reason=f"{VMLINUX} not present/readable (kernel without CONFIG_DEBUG_INFO_BTF)"
)


@pytest.fixture(scope="module")
def kbtf() -> BTF:
    if not os.access(VMLINUX, os.R_OK):
        pytest.skip(f"{VMLINUX} not present/readable (kernel without CONFIG_DEBUG_INFO_BTF)")
    return BTF.load()


@pytest.fixture(scope="module")
def vmlinux_bytes() -> bytes:
    if not os.access(VMLINUX, os.R_OK):
        pytest.skip(f"{VMLINUX} not present/readable")
    return Path(VMLINUX).read_bytes()


# --------------------------------------------------------------------------
# Running kernel
# --------------------------------------------------------------------------

SOCK_COMMON_FIELDS = [
    "skc_num",
    "skc_dport",
    "skc_family",
    "skc_state",
    "skc_rcv_saddr",
    "skc_daddr",
    "skc_v6_daddr",
    "skc_net",
]


@needs_vmlinux
def test_load_and_index() -> None:
    """(Its speed is part of the start-up benchmark, not asserted here.)"""
    btf = BTF.load()
    assert btf.member_offset("sock_common", "skc_num") >= 0  # builds the name index
    assert btf.enum_value("TCP_ESTABLISHED") == 1  # builds the enumerator index
    assert len(btf) > 10_000


def test_tracepoint_args(kbtf: BTF) -> None:
    """Raw tracepoint prototypes (btf_trace_<event>), without `void *__data`."""
    assert kbtf.tracepoint_args("inet_sock_set_state") == ["const struct sock *", "const int", "const int"]
    assert kbtf.tracepoint_args("tcp_receive_reset") == ["struct sock *"]
    assert kbtf.tracepoint_args("no_such_event") is None


def test_default_path_is_vmlinux(kbtf: BTF) -> None:
    explicit = BTF.load(VMLINUX)
    assert len(explicit) == len(kbtf)
    assert explicit.member_offset("sock_common", "skc_num") == kbtf.member_offset("sock_common", "skc_num")


def test_sock_common_layout_consistent(kbtf: BTF) -> None:
    size = kbtf.struct_size("sock_common")
    offsets = {f: kbtf.member_offset("sock_common", f) for f in SOCK_COMMON_FIELDS}
    sizes = {f: kbtf.member_size("sock_common", f) for f in SOCK_COMMON_FIELDS}
    for f in SOCK_COMMON_FIELDS:
        assert kbtf.has_member("sock_common", f)
        assert 0 <= offsets[f] and offsets[f] + sizes[f] <= size, f
    assert sizes["skc_num"] == 2
    assert sizes["skc_dport"] == 2
    assert sizes["skc_family"] == 2
    assert sizes["skc_state"] == 1
    assert sizes["skc_daddr"] == 4
    assert sizes["skc_rcv_saddr"] == 4
    assert sizes["skc_v6_daddr"] == 16
    assert sizes["skc_net"] == 8
    # skc_daddr/skc_rcv_saddr overlay skc_addrpair; skc_dport/skc_num overlay skc_portpair.
    assert offsets["skc_rcv_saddr"] == offsets["skc_daddr"] + 4
    assert offsets["skc_num"] == offsets["skc_dport"] + 2
    assert kbtf.member_offset("sock_common", "skc_addrpair") == offsets["skc_daddr"]
    assert kbtf.member_offset("sock_common", "skc_portpair") == offsets["skc_dport"]
    assert kbtf.member_offset("sock_common", "skc_net.net") == offsets["skc_net"]
    assert kbtf.member_size("sock_common", "skc_net.net") == 8
    # Array subscripts inside the path.
    v6 = offsets["skc_v6_daddr"]
    assert kbtf.member_offset("sock_common", "skc_v6_daddr.in6_u.u6_addr32[3]") == v6 + 12
    assert kbtf.member_size("sock_common", "skc_v6_daddr.in6_u.u6_addr32[3]") == 4
    assert kbtf.member_size("sock_common", "skc_v6_daddr.in6_u.u6_addr8") == 16
    # All distinct fields live at distinct offsets.
    assert len(set(offsets.values())) == len(offsets)
    assert kbtf.struct_size("struct sock_common") == size


def test_nested_paths(kbtf: BTF) -> None:
    assert kbtf.member_offset("sock", "__sk_common.skc_num") == kbtf.member_offset("sock_common", "skc_num")
    assert kbtf.member_offset("sock", "__sk_common") == 0
    assert kbtf.member_offset("tcp_sock", "snd_nxt") > 0
    assert kbtf.member_offset("tcp_sock", "rcv_nxt") > 0
    assert kbtf.member_size("tcp_sock", "snd_nxt") == 4
    # tcp_sock starts with inet_connection_sock -> inet_sock -> sock.
    assert (
        kbtf.member_offset("tcp_sock", "inet_conn.icsk_inet.sk.__sk_common.skc_num")
        == kbtf.member_offset("sock_common", "skc_num")
    )
    ns = kbtf.member_offset("net", "ns")
    inum = kbtf.member_offset("net", "ns.inum")
    assert inum == ns + kbtf.member_offset("ns_common", "inum")
    assert kbtf.member_size("net", "ns.inum") == 4
    assert kbtf.struct_size("sock") > kbtf.struct_size("sock_common")


def test_missing_struct_and_field(kbtf: BTF) -> None:
    with pytest.raises(BTFError, match="no_such_struct_xyz"):
        kbtf.member_offset("no_such_struct_xyz", "a")
    with pytest.raises(BTFError, match="no_such_field_xyz"):
        kbtf.member_offset("sock_common", "no_such_field_xyz")
    with pytest.raises(BTFError, match="sock_common") as info:
        kbtf.member_offset("sock_common", "skc_num.deeper")
    assert "skc_num" in str(info.value)
    with pytest.raises(BTFError, match="nope_xyz"):
        kbtf.member_offset("sock", "__sk_common.nope_xyz")
    with pytest.raises(BTFError, match="no_such_struct_xyz"):
        kbtf.struct_size("no_such_struct_xyz")
    with pytest.raises(BTFError, match="no_such_struct_xyz"):
        kbtf.member_size("no_such_struct_xyz", "a")
    assert not kbtf.has_member("sock_common", "no_such_field_xyz")
    assert not kbtf.has_member("no_such_struct_xyz", "skc_num")
    assert kbtf.has_member("sock", "__sk_common.skc_num")


def test_pointer_cannot_be_followed(kbtf: BTF) -> None:
    with pytest.raises(BTFError, match="skc_prot"):
        kbtf.member_offset("sock_common", "skc_prot.name")


def _find_real_bitfield(btf: BTF) -> tuple[str, str]:
    candidates = [
        ("sock_common", "skc_reuse"),
        ("sock", "sk_userlocks"),
        ("sock", "sk_no_check_tx"),
        ("tcp_sock", "repair"),
        ("tcp_sock", "nonagle"),
        ("sk_buff", "cloned"),
    ]
    for struct_name, field in candidates:
        for m in btf.members(struct_name):
            if m.name == field and m.is_bitfield:
                return struct_name, field
    pytest.fail("none of the usual kernel bitfields is a bitfield in this BTF")


def test_bitfield_raises(kbtf: BTF) -> None:
    struct_name, field = _find_real_bitfield(kbtf)
    with pytest.raises(BTFError, match=field) as info:
        kbtf.member_offset(struct_name, field)
    assert "bitfield" in str(info.value)
    with pytest.raises(BTFError, match=field):
        kbtf.member_size(struct_name, field)
    assert kbtf.has_member(struct_name, field)


def test_bitfield_flags_consistent(kbtf: BTF) -> None:
    """Every named direct member of a few structs resolves iff it is not a bitfield."""
    seen_bitfield = False
    for struct_name in ("sock_common", "sock", "tcp_sock", "sk_buff"):
        for m in kbtf.members(struct_name):
            if not m.name:
                continue
            if m.is_bitfield:
                seen_bitfield = True
                with pytest.raises(BTFError, match="bitfield"):
                    kbtf.member_offset(struct_name, m.name)
            else:
                assert kbtf.member_offset(struct_name, m.name) * 8 == m.bit_offset
    assert seen_bitfield


def test_enums(kbtf: BTF) -> None:
    assert kbtf.enum_value("TCP_CLOSE_WAIT") == 8
    assert kbtf.enum_value("TCP_ESTABLISHED") == 1
    reason = kbtf.enum_value("SKB_DROP_REASON_TCP_INVALID_SYN", "skb_drop_reason")
    assert isinstance(reason, int) and reason > 0
    assert kbtf.enum_value("SKB_DROP_REASON_TCP_INVALID_SYN") == reason
    values = kbtf.enum_values("skb_drop_reason")
    assert values["SKB_DROP_REASON_TCP_INVALID_SYN"] == reason
    assert values["SKB_DROP_REASON_NOT_SPECIFIED"] == 2
    assert kbtf.enum_values("enum skb_drop_reason") == values
    with pytest.raises(BTFError, match="NO_SUCH_ENUMERATOR_XYZ"):
        kbtf.enum_value("NO_SUCH_ENUMERATOR_XYZ")
    with pytest.raises(BTFError, match="no_such_enum_xyz"):
        kbtf.enum_value("TCP_CLOSE_WAIT", "no_such_enum_xyz")
    with pytest.raises(BTFError, match="TCP_CLOSE_WAIT"):
        kbtf.enum_value("TCP_CLOSE_WAIT", "skb_drop_reason")
    with pytest.raises(BTFError, match="no_such_enum_xyz"):
        kbtf.enum_values("no_such_enum_xyz")


def test_func_params(kbtf: BTF) -> None:
    params = kbtf.func_params("tcp_v4_connect")
    assert params is not None
    assert params[0] == ("sk", "struct sock *")
    assert len(params) == 3
    assert params[2] == ("addr_len", "int")
    state = kbtf.func_params("tcp_set_state")
    assert state is not None and len(state) == 2
    assert state[0] == ("sk", "struct sock *")
    assert kbtf.func_params("no_such_function_xyz") is None
    assert kbtf.has_func("tcp_v4_connect")
    assert not kbtf.has_func("no_such_function_xyz")
    assert not kbtf.has_func("sock_common")  # a struct, not a FUNC
    assert kbtf.find_funcs("tcp_v4_connect")[0] == "tcp_v4_connect"
    assert all(
        n == "tcp_v4_connect" or n.startswith("tcp_v4_connect.") for n in kbtf.find_funcs("tcp_v4_connect")
    )
    assert kbtf.find_funcs("no_such_function_xyz") == []
    assert kbtf.func_return_type("tcp_v4_connect") == "int"
    # Variadic function.
    printk = kbtf.func_params("_printk")
    if printk is not None:
        assert printk[0] == ("fmt", "const char *")
        assert printk[-1] == ("", "...")


def test_type_strings(kbtf: BTF) -> None:
    assert kbtf.member_type("sock_common", "skc_prot") == "struct proto *"
    assert re.fullmatch(r"int \(\*\)\(struct sock \*, .*\)", kbtf.member_type("proto", "connect"))
    assert kbtf.member_type("proto", "name") == "char [32]"
    assert kbtf.member_type("sock_common", "skc_net.net") == "struct net *"


# --------------------------------------------------------------------------
# pahole cross-check
# --------------------------------------------------------------------------

_PAHOLE_MEMBER = re.compile(
    r"^\s*(?P<decl>.*?)\b(?P<name>\w+)(?P<arr>(?:\[\d*\])*)(?::(?P<bits>\d+))?;"
    r"\s*/\*\s*(?P<off>\d+)(?::\s*(?P<boff>\d+))?\s+(?P<size>\d+)\s*\*/"
)
_PAHOLE_CLOSE = re.compile(r"^\s*}\s*(?P<name>\w*)(?P<arr>(?:\[\d*\])*)\s*;")


def _pahole_members(struct_name: str) -> list[tuple[str, int, int, bool]]:
    """(path, byte offset, byte size, is bitfield) for members pahole prints."""
    out = subprocess.run(
        ["pahole", "-C", struct_name, VMLINUX], capture_output=True, text=True, check=False
    ).stdout
    stack: list[list[tuple[str, int, int, bool]]] = [[]]
    for line in out.splitlines()[1:]:
        if line.rstrip().endswith("{"):
            stack.append([])
            continue
        close = _PAHOLE_CLOSE.match(line)
        if close:
            if len(stack) == 1:
                break
            inner = stack.pop()
            prefix = close["name"]
            if prefix and close["arr"]:
                continue  # array of anonymous structs: no single path
            stack[-1].extend((f"{prefix}.{n}" if prefix else n, o, s, b) for n, o, s, b in inner)
            continue
        m = _PAHOLE_MEMBER.match(line)
        if m and "(" not in m["decl"]:
            stack[-1].append((m["name"], int(m["off"]), int(m["size"]), m["bits"] is not None))
    return stack[0]


@pytest.mark.skipif(shutil.which("pahole") is None, reason="pahole not installed (apt-get install dwarves)")
@pytest.mark.parametrize("struct_name", ["sock_common", "sock", "tcp_sock", "inet_sock", "net", "ns_common", "sk_buff"])
def test_against_pahole(kbtf: BTF, struct_name: str) -> None:
    members = _pahole_members(struct_name)
    if not members:
        pytest.skip(f"pahole printed nothing usable for struct {struct_name}")
    checked = 0
    for path, offset, size, is_bitfield in members:
        if is_bitfield:
            with pytest.raises(BTFError):
                kbtf.member_offset(struct_name, path)
            continue
        assert kbtf.member_offset(struct_name, path) == offset, path
        assert kbtf.member_size(struct_name, path) == size, path
        checked += 1
    assert checked > 3
    if struct_name == "sock_common":
        names = {p for p, *_ in members}
        assert set(SOCK_COMMON_FIELDS) <= names


# --------------------------------------------------------------------------
# ELF path
# --------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None, reason="needs gcc and objcopy"
)
def test_elf_btf_section(kbtf: BTF, tmp_path: Path) -> None:
    src = tmp_path / "x.c"
    src.write_text("int btf_test_symbol = 42;\n")
    obj = tmp_path / "x.o"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    out = tmp_path / "with_btf.o"
    subprocess.run(
        [
            "objcopy",
            f"--add-section=.BTF={VMLINUX}",
            "--set-section-flags=.BTF=alloc,readonly",
            str(obj),
            str(out),
        ],
        check=True,
    )
    assert out.read_bytes()[:4] == b"\x7fELF"
    elf_btf = BTF.load(str(out))
    assert len(elf_btf) == len(kbtf)
    for field in SOCK_COMMON_FIELDS:
        assert elf_btf.member_offset("sock_common", field) == kbtf.member_offset("sock_common", field)
    assert elf_btf.enum_value("TCP_CLOSE_WAIT") == 8
    # An ELF file without .BTF is a BTFError, not a pyelftools exception.
    with pytest.raises(BTFError, match=r"\.BTF"):
        BTF.load(str(obj))


def test_raw_file_path(kbtf: BTF, vmlinux_bytes: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "vmlinux.btf"
    raw.write_bytes(vmlinux_bytes)
    assert BTF.load(str(raw)).member_offset("sock", "__sk_common.skc_num") == kbtf.member_offset(
        "sock_common", "skc_num"
    )


def test_missing_file() -> None:
    with pytest.raises(BTFError, match="does-not-exist"):
        BTF.load("/nonexistent/does-not-exist.btf")


# --------------------------------------------------------------------------
# Corrupt data
# --------------------------------------------------------------------------


def test_truncated_vmlinux(vmlinux_bytes: bytes) -> None:
    for cut in (0, 3, 23, 24, 100, len(vmlinux_bytes) // 2, len(vmlinux_bytes) - 1):
        with pytest.raises(BTFError):
            BTF.from_bytes(vmlinux_bytes[:cut])


def test_corrupt_vmlinux(vmlinux_bytes: bytes) -> None:
    with pytest.raises(BTFError, match="magic"):
        BTF.from_bytes(b"\x00\x00" + vmlinux_bytes[2:])
    hdr_len = struct.unpack_from("<I", vmlinux_bytes, 4)[0]
    type_off = struct.unpack_from("<I", vmlinux_bytes, 8)[0]
    first_info = hdr_len + type_off + 4
    bad = bytearray(vmlinux_bytes)
    bad[first_info + 3] = 0x1F  # kind 31: unknown
    with pytest.raises(BTFError, match="kind"):
        BTF.from_bytes(bytes(bad))
    bad = bytearray(vmlinux_bytes)
    struct.pack_into("<I", bad, 12, 0xFFFFFF00)  # type_len far too large
    with pytest.raises(BTFError):
        BTF.from_bytes(bytes(bad))


# --------------------------------------------------------------------------
# Synthetic BTF: every kind, both byte orders
# --------------------------------------------------------------------------


class _Builder:
    """Minimal BTF writer for tests."""

    def __init__(self, endian: str) -> None:
        self.e = endian
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def s(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, kflag: bool, size_type: int, extra: bytes = b"") -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self.types += struct.pack(self.e + "III", self.s(name), info, size_type) + extra
        self.count += 1
        return self.count

    def u32s(self, *values: int) -> bytes:
        return struct.pack(self.e + "I" * len(values), *values)

    def blob(self) -> bytes:
        hdr = struct.pack(
            self.e + "HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return hdr + bytes(self.types) + bytes(self.strings)


def _synthetic(endian: str) -> bytes:
    b = _Builder(endian)
    u = b.u32s
    t_int = b.add("int", 1, 0, False, 4, u((1 << 24) | 32))  # 1: signed 32-bit
    t_uchar = b.add("unsigned char", 1, 0, False, 1, u(8))  # 2
    b.add("foo", 7, 0, False, 0)  # 3: FWD struct foo (must not be preferred)
    t_arr = b.add("", 3, 0, False, 0, u(t_int, t_int, 4))  # 4: int[4]
    t_foo = 5
    t_union = 6
    t_u8 = 7
    foo_members = (
        u(b.s("a"), t_int, 0)
        + u(b.s("flags"), t_uchar, (3 << 24) | 32)  # 3-bit bitfield at bit 32
        + u(b.s("b"), t_uchar, 40)
        + u(b.s("arr"), t_arr, 64)
        + u(0, t_union, 192)  # anonymous union at byte 24
    )
    assert b.add("foo", 4, 5, True, 32, foo_members) == t_foo
    union_members = u(b.s("x"), t_int, 0) + u(b.s("y"), t_u8, 0)
    assert b.add("", 5, 2, False, 4, union_members) == t_union
    assert b.add("u8_t", 8, 0, False, t_uchar) == t_u8
    enum = struct.pack(endian + "Ii", b.s("RED"), -1) + struct.pack(endian + "Ii", b.s("BLUE"), 2)
    b.add("color", 6, 2, True, 4, enum)  # 8: signed enum
    t_const = b.add("", 10, 0, False, t_foo)  # 9: const struct foo
    t_cptr = b.add("", 2, 0, False, t_const)  # 10: const struct foo *
    proto = u(b.s("p"), t_cptr) + u(b.s("n"), t_int)
    t_proto = b.add("", 13, 2, False, t_int, proto)  # 11
    b.add("do_foo", 12, 1, False, t_proto)  # 12: FUNC, vlen = linkage
    b.add("do_foo.isra.0", 12, 0, False, t_proto)  # 13
    t_var = b.add("gvar", 14, 0, False, t_int, u(1))  # 14: VAR + linkage
    b.add(".data", 15, 1, False, 4, u(t_var, 0, 4))  # 15: DATASEC
    b.add("double", 16, 0, False, 8)  # 16: FLOAT
    b.add("tag1", 17, 0, False, t_foo, struct.pack(endian + "i", -1))  # 17: DECL_TAG
    b.add("user", 18, 0, False, t_foo)  # 18: TYPE_TAG
    big = u(b.s("HUGE"), 0, 1 << 8) + u(b.s("MAXU"), 0xFFFFFFFF, 0xFFFFFFFF)
    b.add("big", 19, 2, False, 8, big)  # 19: unsigned ENUM64
    sbig = u(b.s("NEG"), 0xFFFFFFFB, 0xFFFFFFFF)
    b.add("sbig", 19, 1, True, 8, sbig)  # 20: signed ENUM64
    anon = u(b.s("ANON_A"), 7) + u(b.s("ANON_B"), 0xFFFFFFFF)
    b.add("", 6, 2, False, 4, anon)  # 21: anonymous unsigned enum
    t_legacy = b.add("lbits", 1, 0, False, 4, u((4 << 16) | 3))  # 22: legacy 3-bit int at bit 4
    t_vol = b.add("", 9, 0, False, t_uchar)  # 23: volatile unsigned char
    bar_members = u(b.s("lb"), t_legacy, 0) + u(b.s("v"), t_vol, 32) + u(b.s("nested"), t_foo, 64)
    b.add("bar", 4, 3, False, 40, bar_members)  # 24: struct without kind_flag
    b.add("", 11, 0, False, t_cptr)  # 25: restrict pointer
    b.add("baz", 4, 0, False, 0)  # 26: empty struct baz (must not be preferred)
    b.add("baz", 4, 1, False, 4, u(b.s("q"), t_int, 0))  # 27: the real struct baz
    b.add("shade", 6, 1, False, 4, u(b.s("BLUE"), 5))  # 28: BLUE again, other value
    b.add("shade2", 6, 1, False, 4, u(b.s("ANON_A"), 7))  # 29: ANON_A again, same value
    return b.blob()


@pytest.mark.parametrize("endian", ["<", ">"])
def test_synthetic_all_kinds(endian: str) -> None:
    btf = BTF.from_bytes(_synthetic(endian))
    assert len(btf) == 29
    expected_kinds = [1, 1, 7, 3, 4, 5, 8, 6, 10, 2, 13, 12, 12, 14, 15, 16, 17, 18, 19, 19, 6, 1, 9, 4, 11, 4, 4, 6, 6]
    assert [btf.kind_of(i) for i in range(1, 30)] == expected_kinds
    assert btf.get_type(16).name == "double" and btf.get_type(16).size_or_type == 8
    assert btf.get_type(18).name == "user"

    assert btf.struct_size("foo") == 32  # the STRUCT, not the earlier FWD
    assert btf.struct_size("baz") == 4  # the one with members, not the empty one
    assert btf.member_offset("struct baz", "q") == 0
    assert btf.member_offset("foo", "a") == 0
    assert btf.member_offset("foo", "b") == 5
    assert btf.member_offset("foo", "arr") == 8
    assert btf.member_size("foo", "arr") == 16
    assert btf.member_offset("foo", "arr[2]") == 16
    assert btf.member_offset("foo", "x") == 24  # inside the anonymous union
    assert btf.member_offset("foo", "y") == 24
    assert btf.member_size("foo", "y") == 1  # through typedef u8_t
    with pytest.raises(BTFError, match="flags"):
        btf.member_offset("foo", "flags")
    with pytest.raises(BTFError, match="out of range"):
        btf.member_offset("foo", "arr[4]")
    flags = [m for m in btf.members("foo") if m.name == "flags"][0]
    assert (flags.bit_offset, flags.bitfield_size) == (32, 3)

    assert btf.member_offset("bar", "nested.arr[1]") == 8 + 8 + 4
    assert btf.member_offset("bar", "nested.x") == 8 + 24
    assert btf.member_offset("bar", "v") == 4
    assert btf.member_type("bar", "v") == "volatile unsigned char"
    with pytest.raises(BTFError, match="lb"):
        btf.member_offset("bar", "lb")  # legacy INT-encoded bitfield
    lb = btf.members("bar")[0]
    assert (lb.bit_offset, lb.bitfield_size) == (4, 3)

    assert btf.enum_value("RED", "color") == -1
    assert btf.enum_value("RED") == -1
    assert btf.enum_value("BLUE", "color") == 2
    assert btf.enum_value("BLUE", "shade") == 5
    with pytest.raises(BTFError, match="ambiguous"):
        btf.enum_value("BLUE")  # two enums, two values
    assert btf.enum_values("big") == {"HUGE": 1 << 40, "MAXU": 2**64 - 1}
    assert btf.enum_value("NEG", "sbig") == -5
    assert btf.enum_value("ANON_B") == 0xFFFFFFFF
    assert btf.enum_value("ANON_A") == 7

    assert btf.func_params("do_foo") == [("p", "const struct foo *"), ("n", "int")]
    assert btf.find_funcs("do_foo") == ["do_foo", "do_foo.isra.0"]
    assert btf.find_funcs("do") == []
    assert btf.has_func("do_foo.isra.0")
    assert btf.type_str(25) == "const struct foo * restrict"
    assert btf.type_str(4) == "int [4]"


def test_synthetic_truncation_always_btferror() -> None:
    blob = _synthetic("<")
    for cut in range(len(blob)):
        with pytest.raises(BTFError):
            BTF.from_bytes(blob[:cut])


def _exercise(btf: BTF) -> None:
    calls: list[Callable[[], object]] = [
        lambda: btf.member_offset("foo", "x"),
        lambda: btf.member_offset("bar", "nested.arr[1]"),
        lambda: btf.member_size("foo", "arr"),
        lambda: btf.struct_size("bar"),
        lambda: btf.enum_value("ANON_B"),
        lambda: btf.enum_value("BLUE"),
        lambda: btf.enum_values("big"),
        lambda: btf.func_params("do_foo"),
        lambda: btf.find_funcs("do_foo"),
        lambda: btf.members("foo"),
        lambda: [btf.type_str(i) for i in range(1, len(btf) + 1)],
        lambda: [btf.type_size(i) for i in range(1, len(btf) + 1)],
    ]
    for call in calls:
        try:
            call()
        except BTFError:
            pass


def test_synthetic_fuzz_only_btferror() -> None:
    """Random byte corruption must surface as BTFError, never struct.error etc."""
    blob = _synthetic("<")
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        try:
            btf = BTF.from_bytes(bytes(data))
        except BTFError:
            continue
        _exercise(btf)
