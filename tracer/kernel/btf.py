"""Pure-Python reader for Linux kernel BTF (BPF Type Format).

The reader understands the raw BTF blob exported by the kernel at
``/sys/kernel/btf/vmlinux`` as well as the ``.BTF`` section of an ELF object
(the latter through pyelftools, which is imported only when needed).  It is
meant for answering the questions an eBPF tracer asks at start-up, e.g.:

* at which byte offset does ``struct sock_common.skc_num`` live on this kernel
  (:meth:`BTF.member_offset`, :meth:`BTF.member_size`, :meth:`BTF.has_member`);
* what is the value of ``TCP_CLOSE_WAIT`` (:meth:`BTF.enum_value`);
* what are the parameters of ``tcp_v4_connect`` (:meth:`BTF.func_params`).

Parsing is a single pass over the type section that records the byte offset
and kind of every type; names are decoded and indexed lazily on first lookup,
so loading the ~5 MB vmlinux blob stays well below a second on CPython.

Only the layout described in the kernel's ``Documentation/bpf/btf.rst`` is
relied upon.  Kinds 1..19 (INT .. ENUM64) are supported; an unknown kind makes
the blob unparseable (its record size cannot be known) and raises
:class:`BTFError`.  Extra header fields (``hdr_len`` > 24) and bytes outside
the type and string sections are ignored.  Split BTF (kernel modules) is not
supported.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "BTF",
    "BTFError",
    "BTFMember",
    "BTFType",
    "VMLINUX_BTF_PATH",
    "KIND_NAMES",
]

VMLINUX_BTF_PATH = "/sys/kernel/btf/vmlinux"

BTF_MAGIC = 0xEB9F
_HDR_MIN_LEN = 24
_ELF_MAGIC = b"\x7fELF"

# BTF kinds (include/uapi/linux/btf.h).
KIND_UNKN = 0
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19
_MAX_KIND = KIND_ENUM64

KIND_NAMES: dict[int, str] = {
    KIND_UNKN: "UNKN",
    KIND_INT: "INT",
    KIND_PTR: "PTR",
    KIND_ARRAY: "ARRAY",
    KIND_STRUCT: "STRUCT",
    KIND_UNION: "UNION",
    KIND_ENUM: "ENUM",
    KIND_FWD: "FWD",
    KIND_TYPEDEF: "TYPEDEF",
    KIND_VOLATILE: "VOLATILE",
    KIND_CONST: "CONST",
    KIND_RESTRICT: "RESTRICT",
    KIND_FUNC: "FUNC",
    KIND_FUNC_PROTO: "FUNC_PROTO",
    KIND_VAR: "VAR",
    KIND_DATASEC: "DATASEC",
    KIND_FLOAT: "FLOAT",
    KIND_DECL_TAG: "DECL_TAG",
    KIND_TYPE_TAG: "TYPE_TAG",
    KIND_ENUM64: "ENUM64",
}

# Size of the data following the 12-byte ``struct btf_type``:
# fixed part and per-vlen element size, indexed by kind.
_EXTRA_FIXED = (0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_EXTRA_PER_VLEN = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)

# Kinds that merely wrap another type (``size_type`` is a type id).
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_QUALIFIER_WORDS = {KIND_CONST: "const", KIND_VOLATILE: "volatile", KIND_RESTRICT: "restrict"}
_COMPOSITES = frozenset({KIND_STRUCT, KIND_UNION})
_ENUMS = frozenset({KIND_ENUM, KIND_ENUM64})

# Guard against reference cycles in corrupt data.
_MAX_CHAIN = 64

_PATH_COMPONENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")


class BTFError(Exception):
    """Raised for malformed BTF data and for failed look-ups."""


@dataclass(frozen=True)
class BTFType:
    """Decoded ``struct btf_type`` header of one type.

    ``size_or_type`` is the size in bytes for INT, ENUM, ENUM64, STRUCT,
    UNION, FLOAT and DATASEC, and a type id for the other kinds.
    """

    id: int
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))


@dataclass(frozen=True)
class BTFMember:
    """One member of a struct or union.

    ``bit_offset`` is relative to the start of the containing aggregate;
    ``bitfield_size`` is 0 for ordinary (byte-addressable) members.  Members
    of anonymous structs/unions appear as one member with an empty name.
    """

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int

    @property
    def is_bitfield(self) -> bool:
        return self.bitfield_size != 0 or self.bit_offset % 8 != 0


class BTF:
    """An indexed, read-only view of one BTF blob (base BTF only)."""

    def __init__(self, data: bytes) -> None:
        """Parse *data* (a raw BTF blob); prefer :meth:`from_bytes`."""
        self._buf = bytes(data)
        buf = self._buf
        if len(buf) < _HDR_MIN_LEN:
            raise BTFError(f"BTF blob too short ({len(buf)} bytes) for a header")
        if struct.unpack_from("<H", buf, 0)[0] == BTF_MAGIC:
            endian = "<"
        elif struct.unpack_from(">H", buf, 0)[0] == BTF_MAGIC:
            endian = ">"
        else:
            raise BTFError(f"bad BTF magic {buf[:2].hex()} (expected 0xeb9f)")
        self._endian = endian
        version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            endian + "BBIIIII", buf, 2
        )
        if version != 1:
            raise BTFError(f"unsupported BTF version {version}")
        if hdr_len < _HDR_MIN_LEN or hdr_len > len(buf):
            raise BTFError(f"bad BTF header length {hdr_len} (blob is {len(buf)} bytes)")
        self._type_start = hdr_len + type_off
        self._type_end = self._type_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        if self._type_end > len(buf) or self._str_end > len(buf):
            raise BTFError(
                f"BTF sections exceed blob: types end at {self._type_end}, strings end at "
                f"{self._str_end}, blob is {len(buf)} bytes (truncated?)"
            )
        if type_len % 4:
            raise BTFError(f"BTF type section length {type_len} is not a multiple of 4")
        if str_len == 0 or buf[self._str_start] != 0:
            raise BTFError("BTF string section must start with an empty string")

        self._hdr = struct.Struct(endian + "III")  # name_off, info, size/type (also 3-u32 records)
        self._u32 = struct.Struct(endian + "I")
        self._upair = struct.Struct(endian + "II")  # btf_param, unsigned btf_enum
        self._spair = struct.Struct(endian + "Ii")  # signed btf_enum

        self._offsets: list[int] = [0]  # index = type id; id 0 is void
        self._kinds = bytearray(1)
        self._parse_types()

        self._strings: dict[int, str] = {}
        self._name_index: dict[str, list[int]] | None = None
        self._off_index: dict[int, list[int]] | None = None
        self._offsets_of: dict[str, list[int]] = {}
        self._enumerator_index: dict[int, list[tuple[int, int]]] | None = None
        self._ptr_size: int | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_bytes(cls, data: bytes) -> BTF:
        """Parse a raw BTF blob."""
        return cls(data)

    @classmethod
    def load(cls, path: str | None = None) -> BTF:
        """Load BTF from *path* (default: the running kernel's vmlinux BTF).

        An ELF file (detected by its magic) is searched for a ``.BTF``
        section; any other file is treated as a raw BTF blob.
        """
        return cls(cls.read_blob(path))

    @staticmethod
    def read_blob(path: str | None = None) -> bytes:
        """The raw BTF blob at *path* (default: the running kernel's): the
        file itself, or the ``.BTF`` section of an ELF file."""
        if path is None:
            path = VMLINUX_BTF_PATH
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BTFError(f"cannot read BTF from {path}: {exc}") from exc
        if data[:4] == _ELF_MAGIC:
            data = _elf_btf_section(data, path)
        return data

    def _parse_types(self) -> None:
        buf = self._buf
        unpack = self._u32.unpack_from
        offsets = self._offsets
        kinds = self._kinds
        fixed = _EXTRA_FIXED
        per_vlen = _EXTRA_PER_VLEN
        off = self._type_start
        end = self._type_end
        append_off = offsets.append
        append_kind = kinds.append
        while off < end:
            if off + 12 > end:
                raise BTFError(f"truncated BTF type record at offset {off}")
            info = unpack(buf, off + 4)[0]
            kind = (info >> 24) & 0x1F
            if kind == KIND_UNKN or kind > _MAX_KIND:
                raise BTFError(
                    f"unsupported BTF kind {kind} for type id {len(offsets)} at offset {off}"
                    " (corrupt data or a kind newer than this reader)"
                )
            append_off(off)
            append_kind(kind)
            off += 12 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
        if off != end:
            raise BTFError(f"last BTF type record overruns the type section (ends at {off} > {end})")

    # ------------------------------------------------------------ raw access

    def __len__(self) -> int:
        """Number of types, not counting void (id 0)."""
        return len(self._offsets) - 1

    def _check_id(self, type_id: int) -> None:
        if not 0 < type_id < len(self._offsets):
            raise BTFError(f"type id {type_id} out of range (1..{len(self._offsets) - 1})")

    def _str(self, off: int) -> str:
        s = self._strings.get(off)
        if s is not None:
            return s
        start = self._str_start + off
        if off < 0 or start >= self._str_end:
            raise BTFError(f"string offset {off} outside the BTF string section")
        nul = self._buf.find(b"\0", start, self._str_end)
        if nul < 0:
            raise BTFError(f"unterminated string at offset {off} in the BTF string section")
        s = self._buf[start:nul].decode("utf-8", "replace")
        self._strings[off] = s
        return s

    def _raw(self, type_id: int) -> tuple[int, int, int]:
        """(name_off, info, size_or_type) of *type_id*."""
        self._check_id(type_id)
        return self._hdr.unpack_from(self._buf, self._offsets[type_id])

    def kind_of(self, type_id: int) -> int:
        """Kind of *type_id* (0 for void)."""
        if type_id == 0:
            return KIND_UNKN
        self._check_id(type_id)
        return self._kinds[type_id]

    def name_of(self, type_id: int) -> str:
        """Name of *type_id* ("" for anonymous types and void)."""
        if type_id == 0:
            return ""
        return self._str(self._raw(type_id)[0])

    def get_type(self, type_id: int) -> BTFType:
        """Decoded header of *type_id*."""
        name_off, info, size_type = self._raw(type_id)
        return BTFType(
            id=type_id,
            kind=(info >> 24) & 0x1F,
            name=self._str(name_off),
            vlen=info & 0xFFFF,
            kind_flag=bool(info >> 31),
            size_or_type=size_type,
        )

    def find_type_ids(self, name: str, kinds: frozenset[int] | set[int] | None = None) -> list[int]:
        """Ids of the types called *name*, optionally restricted to *kinds*."""
        if self._name_index is not None:
            ids = self._name_index.get(name, [])
        else:  # no string decoded: the name's offsets in the string section, then the types that use them
            by_off = self._ids_by_name_off()
            ids = sorted(i for off in self._string_offsets(name) for i in by_off.get(off, ()))
        if kinds is None:
            return list(ids)
        return [i for i in ids if self._kinds[i] in kinds]

    def _ids_by_name_off(self) -> dict[int, list[int]]:
        """Type ids by the string-section offset of their name: one pass over
        the type headers, decoding no string."""
        index = self._off_index
        if index is None:
            index = {}
            buf = self._buf
            u32 = self._u32.unpack_from
            for tid in range(1, len(self._offsets)):
                name_off = u32(buf, self._offsets[tid])[0]
                if name_off:
                    ids = index.get(name_off)
                    if ids is None:
                        index[name_off] = [tid]
                    else:
                        ids.append(tid)
            self._off_index = index
        return index

    def _string_offsets(self, name: str) -> list[int]:
        """Offsets of *name* in the string section (BTF writers dedup strings:
        usually one)."""
        out = self._offsets_of.get(name)
        if out is not None:
            return out
        needle = b"\0" + name.encode() + b"\0"
        out = self._offsets_of[name] = []
        pos = self._buf.find(needle, self._str_start, self._str_end)
        while pos >= 0:
            out.append(pos + 1 - self._str_start)
            pos = self._buf.find(needle, pos + 1, self._str_end)
        return out

    def _names(self) -> dict[str, list[int]]:
        """Type ids by name, every name decoded (for listings; lookups by one
        name go through _ids_by_name_off)."""
        index = self._name_index
        if index is None:
            index = {}
            for name_off, ids in self._ids_by_name_off().items():
                index.setdefault(self._str(name_off), []).extend(ids)
            for ids in index.values():
                ids.sort()
            self._name_index = index
        return index

    def _skip_modifiers(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(_MAX_CHAIN):
            if type_id == 0 or self.kind_of(type_id) not in _MODIFIERS:
                return type_id
            type_id = self._raw(type_id)[2]
        raise BTFError(f"modifier chain too long at type id {type_id} (cycle?)")

    def _members(self, type_id: int) -> Iterator[BTFMember]:
        """Members of composite *type_id*, with bitfields normalised.

        With kind_flag set, ``offset`` packs the bitfield size (high 8 bits)
        and bit offset (low 24 bits).  Without it, a bitfield is encoded in
        the member's INT type (bit offset and width in the INT encoding).
        """
        _, info, _ = self._raw(type_id)
        kflag = info >> 31
        base = self._offsets[type_id] + 12
        unpack = self._hdr.unpack_from
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = unpack(self._buf, base + 12 * i)
            name = self._str(name_off)
            if kflag:
                yield BTFMember(name, mtype, offset & 0xFFFFFF, offset >> 24)
                continue
            target = self._skip_modifiers(mtype)
            if target and self._kinds[target] == KIND_INT:
                _, int_off, int_bits = self._int_encoding(target)
                if int_off or int_bits != 8 * self._raw(target)[2]:
                    yield BTFMember(name, mtype, offset + int_off, int_bits)
                    continue
            yield BTFMember(name, mtype, offset, 0)

    def members(self, struct_name: str) -> list[BTFMember]:
        """Direct members of struct/union *struct_name* (anonymous ones unnamed)."""
        return list(self._members(self._find_composite(struct_name)))

    def _int_encoding(self, type_id: int) -> tuple[int, int, int]:
        """(encoding, bit offset, bits) of an INT type."""
        data = self._u32.unpack_from(self._buf, self._offsets[type_id] + 12)[0]
        return (data >> 24) & 0x0F, (data >> 16) & 0xFF, data & 0xFF

    # ------------------------------------------------------------- type sizes

    def _pointer_size(self) -> int:
        if self._ptr_size is None:
            size = 8
            for name in ("long unsigned int", "long int", "unsigned long", "long"):
                ids = self.find_type_ids(name, {KIND_INT})
                if ids:
                    size = self._raw(ids[0])[2]
                    break
            self._ptr_size = size
        return self._ptr_size

    def type_size(self, type_id: int) -> int:
        """Size in bytes of *type_id*, resolving typedefs, modifiers and arrays."""
        return self._type_size(type_id, 0)

    def _type_size(self, type_id: int, depth: int) -> int:
        while depth < _MAX_CHAIN:
            depth += 1
            if type_id == 0:
                raise BTFError("void has no size")
            kind = self.kind_of(type_id)
            _, _, size_type = self._raw(type_id)
            if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_DATASEC):
                return size_type
            if kind == KIND_PTR:
                return self._pointer_size()
            if kind == KIND_ARRAY:
                elem, _, nelems = self._hdr.unpack_from(self._buf, self._offsets[type_id] + 12)
                return self._type_size(elem, depth) * nelems
            if kind in _MODIFIERS or kind == KIND_VAR:
                type_id = size_type
                continue
            raise BTFError(
                f"type id {type_id} ({KIND_NAMES[kind]} {self.name_of(type_id)!r}) has no size"
            )
        raise BTFError(f"type chain too long at type id {type_id} (cycle?)")

    # ---------------------------------------------------------- structs/unions

    def _find_composite(self, struct_name: str) -> int:
        name = _strip_tag(struct_name)
        ids = self.find_type_ids(name)
        composites = [i for i in ids if self._kinds[i] in _COMPOSITES]
        if composites:
            # Prefer a definition with members, then any non-empty one.
            for tid in composites:
                if self._raw(tid)[1] & 0xFFFF:
                    return tid
            for tid in composites:
                if self._raw(tid)[2]:
                    return tid
            return composites[0]
        for tid in ids:  # e.g. "possible_net_t": typedef of an anonymous struct
            if self._kinds[tid] == KIND_TYPEDEF:
                target = self._skip_modifiers(tid)
                if target and self._kinds[target] in _COMPOSITES:
                    return target
        if any(self._kinds[i] == KIND_FWD for i in ids):
            raise BTFError(f"struct {name!r} is only forward-declared in BTF (no definition)")
        raise BTFError(f"no struct or union named {name!r} in BTF")

    def _find_member(self, type_id: int, name: str, depth: int = 0) -> tuple[int, BTFMember] | None:
        """Find *name* in composite *type_id*, descending into anonymous members.

        Returns (bit offset of the member's containing anonymous aggregates
        relative to *type_id*, member) or None.
        """
        if depth > _MAX_CHAIN:
            raise BTFError(f"anonymous members nested too deeply in type id {type_id} (cycle?)")
        anonymous: list[BTFMember] = []
        for m in self._members(type_id):
            if m.name == name:
                return 0, m
            if not m.name:
                anonymous.append(m)
        for m in anonymous:
            inner = self._skip_modifiers(m.type_id)
            if inner and self._kinds[inner] in _COMPOSITES:
                found = self._find_member(inner, name, depth + 1)
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def _resolve_path(self, struct_name: str, path: str) -> tuple[int, int, int, str]:
        """Walk *path* inside *struct_name*.

        Returns (bit offset, type id, bitfield size in bits or 0, display
        name of the last component).
        """
        cur = self._find_composite(struct_name)
        sname = f"{KIND_NAMES[self._kinds[cur]].lower()} {_strip_tag(struct_name)}"
        components = path.split(".") if path else []
        if not components or any(not c for c in components):
            raise BTFError(f"invalid member path {path!r} for {sname}")
        bit_offset = 0
        type_id = cur
        bitfield = 0
        walked: list[str] = []
        for comp in components:
            match = _PATH_COMPONENT.match(comp.strip())
            if match is None:
                raise BTFError(f"invalid member path component {comp!r} in {path!r} for {sname}")
            field, subscripts = match.group(1), match.group(2)
            container = self._skip_modifiers(type_id)
            where = f"{sname}.{'.'.join(walked)}" if walked else sname
            if bitfield:
                raise BTFError(f"member {where} is a bitfield; it has no member {field!r}")
            if container == 0 or self._kinds[container] not in _COMPOSITES:
                what = "void" if container == 0 else KIND_NAMES[self._kinds[container]]
                raise BTFError(
                    f"member {where} is not a struct or union ({what}); cannot look up {field!r}"
                    f" (path {path!r}; pointers cannot be followed in an offset)"
                )
            found = self._find_member(container, field)
            if found is None:
                raise BTFError(f"{where} has no member {field!r} (path {path!r})")
            anon_bits, member = found
            bit_offset += anon_bits + member.bit_offset
            type_id = member.type_id
            bitfield = member.bitfield_size
            walked.append(field)
            for idx_match in _INDEX.finditer(subscripts):
                index = int(idx_match.group(1))
                arr = self._skip_modifiers(type_id)
                if arr == 0 or self._kinds[arr] != KIND_ARRAY:
                    raise BTFError(f"member {sname}.{'.'.join(walked)} is not an array (path {path!r})")
                elem, _, nelems = self._hdr.unpack_from(self._buf, self._offsets[arr] + 12)
                if index >= nelems and nelems:
                    raise BTFError(
                        f"index {index} out of range for {sname}.{'.'.join(walked)}"
                        f" ({nelems} elements, path {path!r})"
                    )
                bit_offset += index * self.type_size(elem) * 8
                type_id = elem
                walked[-1] += f"[{index}]"
        return bit_offset, type_id, bitfield, f"{sname}.{'.'.join(walked)}"

    def _byte_member(self, struct_name: str, path: str) -> tuple[int, int]:
        bit_offset, type_id, bitfield, where = self._resolve_path(struct_name, path)
        if bitfield or bit_offset % 8:
            raise BTFError(
                f"member {where} is a bitfield ({bitfield or '?'} bits at bit offset"
                f" {bit_offset}); it is not byte-addressable"
            )
        return bit_offset // 8, type_id

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of member *path* (``"a.b.c"``, ``"arr[2]"``) in *struct_name*.

        Members of anonymous structs/unions are found transparently and
        typedefs/qualifiers are followed along the path.  Raises
        :class:`BTFError` if the struct or a member is missing, or if the
        member is a bitfield.
        """
        return self._byte_member(struct_name, path)[0]

    def member_bit_offset(self, struct_name: str, path: str) -> int:
        """Bit offset of member *path* in *struct_name* (bitfields allowed)."""
        return self._resolve_path(struct_name, path)[0]

    def member_size(self, struct_name: str, path: str) -> int:
        """Size in bytes of the type of member *path* in *struct_name*."""
        return self.type_size(self._byte_member(struct_name, path)[1])

    def member_type(self, struct_name: str, path: str) -> str:
        """C type string of member *path* in *struct_name* (bitfields allowed)."""
        return self.type_str(self._resolve_path(struct_name, path)[1])

    def has_member(self, struct_name: str, path: str) -> bool:
        """Whether *struct_name* exists and has member *path* (bitfields included)."""
        try:
            self._resolve_path(struct_name, path)
        except BTFError:
            return False
        return True

    def struct_size(self, name: str) -> int:
        """``sizeof(struct name)`` (or union)."""
        return self._raw(self._find_composite(name))[2]

    # ------------------------------------------------------------------ enums

    def _enumerators(self, type_id: int) -> Iterator[tuple[str, int]]:
        for name_off, val in self._enumerators_raw(type_id):
            yield self._str(name_off), val

    def _enumerators_raw(self, type_id: int) -> Iterator[tuple[int, int]]:
        """(name offset, value) of each enumerator: no string decoded."""
        _, info, _ = self._raw(type_id)
        signed = bool(info >> 31)
        vlen = info & 0xFFFF
        base = self._offsets[type_id] + 12
        buf = self._buf
        if self._kinds[type_id] == KIND_ENUM:
            unpack = (self._spair if signed else self._upair).unpack_from
            for i in range(vlen):
                yield unpack(buf, base + 8 * i)
        else:
            for i in range(vlen):
                name_off, lo, hi = self._hdr.unpack_from(buf, base + 12 * i)
                val = (hi << 32) | lo
                if signed and val >= 1 << 63:
                    val -= 1 << 64
                yield name_off, val

    def _find_enum(self, enum_name: str) -> int:
        name = _strip_tag(enum_name)
        ids = self.find_type_ids(name)
        enums = [i for i in ids if self._kinds[i] in _ENUMS]
        for tid in enums:
            if self._raw(tid)[1] & 0xFFFF:
                return tid
        if enums:
            return enums[0]
        for tid in ids:  # typedef enum { ... } name_t;
            if self._kinds[tid] == KIND_TYPEDEF:
                target = self._skip_modifiers(tid)
                if target and self._kinds[target] in _ENUMS:
                    return target
        raise BTFError(f"no enum named {name!r} in BTF")

    def enum_values(self, enum_name: str) -> dict[str, int]:
        """All enumerators of enum *enum_name* (ENUM or ENUM64)."""
        return dict(self._enumerators(self._find_enum(enum_name)))

    def enum_value(self, enumerator: str, enum_name: str | None = None) -> int:
        """Value of *enumerator*, in enum *enum_name* or in any enum (incl. anonymous).

        Without *enum_name*, an enumerator defined with different values in
        several enums (e.g. per-file ``Opt_*`` enums) is ambiguous and raises
        :class:`BTFError`.
        """
        if enum_name is not None:
            values = self.enum_values(enum_name)
            if enumerator not in values:
                raise BTFError(f"enum {enum_name!r} has no enumerator {enumerator!r}")
            return values[enumerator]
        by_off = self._enumerator_map()
        hits = [hit for off in self._string_offsets(enumerator) for hit in by_off.get(off, ())]
        if not hits:
            raise BTFError(f"no enumerator {enumerator!r} in any BTF enum")
        values = {val for _, val in hits}
        if len(values) > 1:
            owners = ", ".join(
                f"{self.name_of(tid) or '<anonymous>'}={val}" for tid, val in hits[:6]
            )
            raise BTFError(
                f"enumerator {enumerator!r} is ambiguous ({owners}); pass enum_name to choose"
            )
        return hits[0][1]

    def _enumerator_map(self) -> dict[int, list[tuple[int, int]]]:
        """(enum type id, value) of every enumerator, by its name's offset."""
        index = self._enumerator_index
        if index is None:
            index = {}
            kinds = self._kinds
            for tid in range(1, len(self._offsets)):
                if kinds[tid] in _ENUMS:
                    for name_off, val in self._enumerators_raw(tid):
                        index.setdefault(name_off, []).append((tid, val))
            self._enumerator_index = index
        return index

    # -------------------------------------------------------------- functions

    def _find_func(self, func_name: str) -> int | None:
        ids = self.find_type_ids(func_name, {KIND_FUNC})
        return ids[0] if ids else None

    def has_func(self, name: str) -> bool:
        """Whether a BTF FUNC called *name* exists."""
        return self._find_func(name) is not None

    def find_funcs(self, name: str) -> list[str]:
        """Sorted FUNC names equal to *name* or ``name + "."`` + compiler suffix."""
        prefix = name + "."
        kinds = self._kinds
        return sorted(
            fname
            for fname, ids in self._names().items()
            if (fname == name or fname.startswith(prefix)) and any(kinds[i] == KIND_FUNC for i in ids)
        )

    def func_params(self, func_name: str) -> list[tuple[str, str]] | None:
        """[(name, C type)] of FUNC *func_name*'s parameters, or None if absent.

        A variadic function's trailing ``...`` is reported as ``("", "...")``.
        """
        tid = self._find_func(func_name)
        if tid is None:
            return None
        proto = self._raw(tid)[2]
        self._check_id(proto)
        if self._kinds[proto] != KIND_FUNC_PROTO:
            raise BTFError(f"func {func_name!r} does not point to a FUNC_PROTO")
        return [(name, "..." if ptype == 0 else self.type_str(ptype)) for name, ptype in self._params(proto)]

    def func_return_type(self, func_name: str) -> str | None:
        """C type string of FUNC *func_name*'s return type, or None if absent."""
        tid = self._find_func(func_name)
        if tid is None:
            return None
        return self.type_str(self._raw(self._raw(tid)[2])[2])

    def tracepoint_args(self, event: str) -> list[str] | None:
        """C types of raw tracepoint *event*'s arguments (its TP_PROTO), from
        the ``btf_trace_<event>`` typedef, without the leading ``void *__data``;
        None when the kernel's BTF has no such typedef."""
        ids = self.find_type_ids(f"btf_trace_{event}", {KIND_TYPEDEF})
        if not ids:
            return None
        ptr = self._skip_modifiers(self._raw(ids[0])[2])
        if self._kinds[ptr] != KIND_PTR:
            return None
        proto = self._skip_modifiers(self._raw(ptr)[2])
        if self._kinds[proto] != KIND_FUNC_PROTO:
            return None
        return [self.type_str(t) for _, t in self._params(proto)][1:]

    def _params(self, proto_id: int) -> Iterator[tuple[str, int]]:
        _, info, _ = self._raw(proto_id)
        base = self._offsets[proto_id] + 12
        unpack = self._upair.unpack_from
        for i in range(info & 0xFFFF):
            name_off, ptype = unpack(self._buf, base + 8 * i)
            yield self._str(name_off), ptype

    # ---------------------------------------------------------- type strings

    def type_str(self, type_id: int) -> str:
        """Readable C spelling of *type_id*, e.g. ``"const struct sk_buff *"``."""
        return self._decl(type_id, "", 0)

    def _decl(self, type_id: int, inner: str, depth: int) -> str:
        if depth > _MAX_CHAIN:
            raise BTFError(f"type chain too long at type id {type_id} (cycle?)")
        if type_id == 0:
            return _join("void", inner)
        kind = self.kind_of(type_id)
        name_off, info, size_type = self._raw(type_id)
        name = self._str(name_off)
        if kind in (KIND_INT, KIND_FLOAT, KIND_TYPEDEF):
            return _join(name, inner)
        if kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FWD):
            if kind == KIND_FWD:
                word = "union" if info >> 31 else "struct"
            elif kind in _ENUMS:
                word = "enum"
            else:
                word = KIND_NAMES[kind].lower()
            return _join(f"{word} {name}" if name else f"{word} {{...}}", inner)
        if kind == KIND_PTR:
            target = self._skip_tags(size_type)
            if target and self._kinds[target] in (KIND_ARRAY, KIND_FUNC_PROTO):
                return self._decl(size_type, f"(*{inner})", depth + 1)
            # "char *p" but "char * const p".
            star = "* " if inner[:1].isalpha() else "*"
            return self._decl(size_type, star + inner, depth + 1)
        if kind in _QUALIFIER_WORDS:
            word = _QUALIFIER_WORDS[kind]
            target = self._skip_tags(size_type)
            if target and self._kinds[target] == KIND_PTR:
                # Qualified pointer: "char * const".
                return self._decl(size_type, _join(word, inner), depth + 1)
            return f"{word} {self._decl(size_type, inner, depth + 1)}"
        if kind == KIND_TYPE_TAG:
            return self._decl(size_type, inner, depth + 1)
        if kind == KIND_ARRAY:
            elem, _, nelems = self._hdr.unpack_from(self._buf, self._offsets[type_id] + 12)
            return self._decl(elem, f"{inner}[{nelems}]", depth + 1)
        if kind == KIND_FUNC_PROTO:
            params = []
            for _, ptype in self._params(type_id):
                params.append("..." if ptype == 0 else self._decl(ptype, "", depth + 1))
            return self._decl(size_type, f"{inner}({', '.join(params) or 'void'})", depth + 1)
        if kind in (KIND_FUNC, KIND_VAR):
            # Spell the declared entity itself, e.g. "int tcp_v4_connect(struct sock *, ...)".
            return self._decl(size_type, inner or name, depth + 1)
        return _join(f"<{KIND_NAMES[kind]} {name}>" if name else f"<{KIND_NAMES[kind]}>", inner)

    def _skip_tags(self, type_id: int) -> int:
        for _ in range(_MAX_CHAIN):
            if type_id == 0 or self.kind_of(type_id) != KIND_TYPE_TAG:
                return type_id
            type_id = self._raw(type_id)[2]
        raise BTFError(f"type tag chain too long at type id {type_id} (cycle?)")


def _strip_tag(name: str) -> str:
    """"struct sock" -> "sock" (also "union x", "enum y")."""
    name = name.strip()
    for prefix in ("struct ", "union ", "enum "):
        if name.startswith(prefix):
            return name[len(prefix):].strip()
    return name


def _join(base: str, inner: str) -> str:
    return f"{base} {inner}" if inner else base


def _elf_btf_section(data: bytes, path: str) -> bytes:
    """Contents of the ``.BTF`` section of ELF image *data*."""
    try:
        from elftools.elf.elffile import ELFFile
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise BTFError(f"{path} is an ELF file; reading its .BTF section needs pyelftools") from exc
    try:
        elf = ELFFile(io.BytesIO(data))
        section = elf.get_section_by_name(".BTF")
        if section is None:
            raise BTFError(f"{path}: ELF file has no .BTF section")
        if section["sh_type"] == "SHT_NOBITS":
            raise BTFError(f"{path}: .BTF section has no data (SHT_NOBITS)")
        return bytes(section.data())
    except BTFError:
        raise
    except Exception as exc:  # pyelftools raises assorted types on malformed ELF
        raise BTFError(f"{path}: cannot read ELF .BTF section: {exc}") from exc
