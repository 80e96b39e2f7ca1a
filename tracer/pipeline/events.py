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
import dataclasses

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


def format_addr(family: int, raw: bytes, port: int) -> str:
    """`IP:PORT`, IPv6 as `[IP]:PORT`."""
    if family == AF_INET6:
        return f"[{ipaddress.IPv6Address(raw[:16])}]:{port}"
    return f"{ipaddress.IPv4Address(raw[:4])}:{port}"


class EventBase:
    """What every decoded `struct tc_event` offers besides its fields."""

    _flags: dict[str, int] = {}  # the header's enum tc_flag (set per layout)
    _types: frozenset[str] = frozenset()  # the header's event type names (set per layout)

    def __post_init__(self):
        if self.type not in self._types:
            raise ValueError(f"unknown event type {self.type!r} (bpf/tcpcollide.h has {', '.join(sorted(self._types))})")

    def has(self, flag: str) -> bool:
        return bool(self.flags & self._flags[flag])

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


# Fields decoded to the names of a header enum: field -> (enum, prefix dropped).
NAMED_FIELDS = {"type": ("tc_event_type", "TC_EV_"), "hook": ("tc_hook", "TC_HOOK_")}
# Wire fields that recordings of older versions filled with something else,
# told by a flag: wire field -> (the Event attribute that takes the value when
# the flag is set, the flag). The wire field's own attribute is 0 then, and the
# other attribute is 0 otherwise: one attribute, one meaning.
LEGACY_FIELDS = {"syn_age_ns": ("observed_age_ns", "TC_F_AGE_OBSERVED")}


def _names(enums: dict[str, dict[str, int]], enum: str, prefix: str) -> dict[int, str]:
    if enum not in enums:
        raise LayoutError(f"enum {enum} not found")
    return {v: k.removeprefix(prefix).lower() for k, v in enums[enum].items()}


class Layout:
    """Everything derived from one text of bpf/tcpcollide.h: the struct
    format, the field list, the enums, the `Event` class (one attribute per
    field of `struct tc_event`, in order, plus those of LEGACY_FIELDS and
    `raw`) and decode/encode.

    Per C type: a scalar is an int (default 0), a `char` array a string cut at
    its NUL (default ""), a `__u8` array bytes (default zeroes); the fields of
    NAMED_FIELDS hold the enumerator's name. Nothing here lists the fields:
    a field added to or renamed in the header is an attribute of Event,
    decoded and encoded, with no change to this module."""

    def __init__(self, text: str):
        self.format, self.fields, self.enums = parse_layout(text)
        self.struct = struct.Struct(self.format)
        self.size = self.struct.size
        self.field_names = tuple(name for name, _, _ in self.fields)
        missing = [f for f in ("type", "flags", "family", "laddr", "lport", "raddr", "rport")
                   if f not in self.field_names]
        if missing:
            raise LayoutError(f"struct tc_event lacks {', '.join(missing)}")
        self.event_types = _names(self.enums, *NAMED_FIELDS["type"])
        self.hooks = _names(self.enums, *NAMED_FIELDS["hook"])
        if "tc_flag" not in self.enums:
            raise LayoutError("enum tc_flag not found")
        self.flags = self.enums["tc_flag"]
        self._type_numbers = {v: k for k, v in self.event_types.items()}
        self._hook_numbers = {v: k for k, v in self.hooks.items()}
        specs = []
        for name, ctype, n in self.fields:
            if name in NAMED_FIELDS or ctype == "char":
                kind, default = str, ""
            elif n:
                kind, default = bytes, bytes(n)
            else:
                kind, default = int, 0
            specs.append((name, kind, dataclasses.field(default=default)))
        self._legacy = [(self.field_names.index(wire), attr, self.flags[flag])
                        for wire, (attr, flag) in LEGACY_FIELDS.items() if wire in self.field_names]
        specs += [(attr, int, dataclasses.field(default=0)) for _, attr, _ in self._legacy]
        specs.append(("raw", bytes, dataclasses.field(default=b"", repr=False, compare=False)))
        self.event = dataclasses.make_dataclass(
            "Event", specs, bases=(EventBase,), frozen=True,
            namespace={"__doc__": "One kernel event (decoded `struct tc_event`), its fields from bpf/tcpcollide.h.",
                       "__module__": __name__, "_flags": self.flags, "_types": frozenset(self.event_types.values())})
        self._type_index, self._family_index = self.field_names.index("type"), self.field_names.index("family")
        self._flags_index = self.field_names.index("flags")
        # per field: wire value -> attribute, attribute -> wire value
        self._decoders, self._encoders = [], []
        for name, ctype, n in self.fields:
            if name == "type":
                dec, enc = self.event_types.__getitem__, self._type_numbers.__getitem__
            elif name == "hook":
                dec = lambda v: self.hooks.get(v, f"hook{v}")  # noqa: E731 - an unknown hook stays visible
                enc = lambda h: self._hook_numbers.get(h, 0)  # noqa: E731
            elif ctype == "char":
                dec, enc = _cstr, (lambda s, n=n: s.encode()[:n - 1])
            elif n:
                dec, enc = bytes, (lambda b, n=n: bytes(b).ljust(n, b"\0"))
            else:
                dec = enc = None
            self._decoders.append(dec)
            self._encoders.append(enc)
        self._decoding = [(i, dec) for i, dec in enumerate(self._decoders) if dec is not None]
        self._attrs = self.field_names + tuple(attr for _, attr, _ in self._legacy)
        self._new = object.__new__

    def decode(self, raw: bytes):
        """Decode one perf-buffer record or recording record."""
        if len(raw) < self.size:
            raise DecodeError(f"record of {len(raw)} bytes, expected {self.size}")
        values = self.struct.unpack_from(raw)
        etype, family = values[self._type_index], values[self._family_index]
        if etype not in self.event_types:
            raise DecodeError(f"unknown event type {etype}")
        if family not in (AF_INET, AF_INET6):
            raise DecodeError(f"unknown address family {family}")
        args = list(values)
        for index, dec in self._decoding:
            args[index] = dec(args[index])
        flags = values[self._flags_index]
        for index, attr, bit in self._legacy:
            if flags & bit:
                args.append(args[index])
                args[index] = 0
            else:
                args.append(0)
        # validated above: built without the dataclass's __init__ (frozen: a
        # __setattr__ per field) and its __post_init__, on the hot path
        ev = self._new(self.event)
        ev.__dict__.update(zip(self._attrs, args), raw=bytes(raw[:self.size]))
        return ev

    def encode(self, ev) -> bytes:
        """The inverse of decode(), for synthetic streams in tests and replays."""
        values = [getattr(ev, name) if enc is None else enc(getattr(ev, name))
                  for name, enc in zip(self.field_names, self._encoders)]
        for index, attr, bit in self._legacy:
            if ev.flags & bit:
                values[index] = getattr(ev, attr)
        return self.struct.pack(*values)


LAYOUT = Layout(HEADER.read_text())
EVENT_STRUCT = LAYOUT.struct
EVENT_SIZE = LAYOUT.size
FIELDS = LAYOUT.fields
ENUMS = LAYOUT.enums
EVENT_TYPES = LAYOUT.event_types
HOOKS = LAYOUT.hooks
FLAGS = LAYOUT.flags
Event = LAYOUT.event
decode = LAYOUT.decode
encode = LAYOUT.encode
