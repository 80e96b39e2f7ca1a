"""Kernel events as Python sees them, decoded by the layout in bpf/tcpcollide.h.

The C header is the one home of the layout: this module parses its `struct
tc_event` and its enums at import time and builds a `struct` format from them,
so the BPF programs and the Python decoder cannot drift apart. A live test
checks the parsed size against the size bcc compiled.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field

from tracer.resources import bpf_dir

HEADER = bpf_dir() / "tcpcollide.h"

_CTYPES = {"__u8": ("B", 1), "__u16": ("H", 2), "__u32": ("I", 4), "__u64": ("Q", 8), "char": ("s", 1)}
_FIELD_RE = re.compile(r"(__u8|__u16|__u32|__u64|char)\s+(\w+)\s*(?:\[(\d+)\])?\s*;")
_ENUM_RE = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_ENUMERATOR_RE = re.compile(r"^\s*(\w+)\s*=\s*(\d+)\s*,", re.M)

AF_INET = 2
AF_INET6 = 10


class LayoutError(Exception):
    """bpf/tcpcollide.h does not follow the grammar this parser knows."""


def parse_layout(text: str) -> tuple[str, list[tuple[str, str, int]], dict[str, dict[str, int]]]:
    """Parse the header text into (struct format, fields, enums).

    fields: (name, C type, array length or 0) in order. The format is little
    endian with natural alignment checked, never silently padded."""
    m = re.search(r"struct\s+tc_event\s*\{(.*?)\};", text, re.S)
    if not m:
        raise LayoutError("struct tc_event not found")
    fmt = "<"
    offset = 0
    fields = []
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    for line in body.splitlines():
        if not line.strip():
            continue
        fm = _FIELD_RE.fullmatch(line.strip())
        if fm is None:
            raise LayoutError(f"struct tc_event: cannot parse {line.strip()!r} (one __u8/__u16/__u32/__u64/char field per line)")
        ctype, name, count = fm.groups()
        code, size = _CTYPES[ctype]
        n = int(count) if count else 0
        if offset % size:
            raise LayoutError(f"field {name} at offset {offset} is not naturally aligned")
        if ctype == "char" or (ctype == "__u8" and n):
            fmt += f"{n or 1}s"
        elif n:
            fmt += f"{n}{code}"
        else:
            fmt += code
        offset += size * (n or 1)
        fields.append((name, ctype, n))
    if not fields:
        raise LayoutError("struct tc_event has no fields")
    if offset % 8:
        raise LayoutError(f"struct tc_event size {offset} is not a multiple of 8")
    enums = {
        name: {k: int(v) for k, v in _ENUMERATOR_RE.findall(body)} for name, body in _ENUM_RE.findall(text)
    }
    return fmt, fields, enums


_FMT, FIELDS, ENUMS = parse_layout(HEADER.read_text())
EVENT_STRUCT = struct.Struct(_FMT)
EVENT_SIZE = EVENT_STRUCT.size
EVENT_TYPES = {v: k.removeprefix("TC_EV_").lower() for k, v in ENUMS["tc_event_type"].items()}
HOOKS = {v: k.removeprefix("TC_HOOK_").lower() for k, v in ENUMS["tc_hook"].items()}
FLAGS = ENUMS["tc_flag"]

_FIELD_NAMES = [name for name, _, _ in FIELDS]


def format_addr(family: int, raw: bytes, port: int) -> str:
    """`IP:PORT`, IPv6 as `[IP]:PORT`."""
    if family == AF_INET6:
        return f"[{ipaddress.IPv6Address(raw[:16])}]:{port}"
    return f"{ipaddress.IPv4Address(raw[:4])}:{port}"


@dataclass(frozen=True)
class Event:
    """One kernel event (decoded `struct tc_event`)."""

    ts_ns: int
    type: str
    hook: str
    cpu: int
    netns: int
    family: int
    laddr: bytes
    lport: int
    raddr: bytes
    rport: int
    oldstate: int
    newstate: int
    skaddr: int
    seq: int = 0
    ack: int = 0
    age_ns: int = 0
    age_jiffies: int = 0
    flags: int = 0
    sk_ino: int = 0
    pid: int = 0
    comm: str = ""
    backlog: int = 0
    max_backlog: int = 0
    conn_pid: int = 0
    conn_comm: str = ""
    unread: int = 0
    raw: bytes = field(default=b"", repr=False, compare=False)  # the record as read (decode() keeps it)

    def has(self, flag: str) -> bool:
        return bool(self.flags & FLAGS[flag])

    @property
    def local(self) -> str:
        return format_addr(self.family, self.laddr, self.lport)

    @property
    def remote(self) -> str:
        return format_addr(self.family, self.raddr, self.rport)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class DecodeError(Exception):
    """A record is not a valid struct tc_event."""


def decode(raw: bytes) -> Event:
    """Decode one perf-buffer record or recording record."""
    if len(raw) < EVENT_SIZE:
        raise DecodeError(f"record of {len(raw)} bytes, expected {EVENT_SIZE}")
    values = dict(zip(_FIELD_NAMES, EVENT_STRUCT.unpack_from(raw)))
    etype = EVENT_TYPES.get(values["type"])
    if etype is None:
        raise DecodeError(f"unknown event type {values['type']}")
    family = values["family"]
    if family not in (AF_INET, AF_INET6):
        raise DecodeError(f"unknown address family {family}")
    return Event(
        ts_ns=values["ts_ns"],
        type=etype,
        hook=HOOKS.get(values["hook"], f"hook{values['hook']}"),
        cpu=values["cpu"],
        netns=values["netns"],
        family=family,
        laddr=values["laddr"],
        lport=values["lport"],
        raddr=values["raddr"],
        rport=values["rport"],
        oldstate=values["oldstate"],
        newstate=values["newstate"],
        skaddr=values["skaddr"],
        seq=values["seq"],
        ack=values["ack"],
        age_ns=values["age_ns"],
        age_jiffies=values["age_jiffies"],
        flags=values["flags"],
        sk_ino=values["sk_ino"],
        pid=values["pid"],
        comm=_cstr(values["comm"]),
        backlog=values["backlog"],
        max_backlog=values["max_backlog"],
        conn_pid=values["conn_pid"],
        conn_comm=_cstr(values["conn_comm"]),
        unread=values["unread"],
        raw=bytes(raw[:EVENT_SIZE]),
    )


def encode(ev: Event) -> bytes:
    """The inverse of decode(), for synthetic streams in tests and replays."""
    types = {v: k for k, v in EVENT_TYPES.items()}
    hooks = {v: k for k, v in HOOKS.items()}
    values = {
        "ts_ns": ev.ts_ns, "skaddr": ev.skaddr, "age_ns": ev.age_ns, "netns": ev.netns,
        "type": types[ev.type], "hook": hooks.get(ev.hook, 0), "cpu": ev.cpu, "pid": ev.pid,
        "seq": ev.seq, "ack": ev.ack, "age_jiffies": ev.age_jiffies, "sk_ino": ev.sk_ino,
        "flags": ev.flags, "backlog": ev.backlog, "max_backlog": ev.max_backlog,
        "family": ev.family, "lport": ev.lport, "rport": ev.rport, "oldstate": ev.oldstate,
        "newstate": ev.newstate, "laddr": ev.laddr.ljust(16, b"\0"), "raddr": ev.raddr.ljust(16, b"\0"),
        "comm": ev.comm.encode()[:15], "conn_pid": ev.conn_pid, "conn_comm": ev.conn_comm.encode()[:15],
        "unread": ev.unread,
    }
    return EVENT_STRUCT.pack(*(values[n] for n in _FIELD_NAMES))
