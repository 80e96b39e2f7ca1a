"""The few bpf(2) commands the tracer issues itself, without bcc or clang.

bcc compiles; the first load of a compiled object is bcc's, later ones may be
this module's (tracer/kernel/objcache.py: maps, BTF and programs created from a
cached object, no compile). Besides, it answers two questions cheaply:

- can this kernel load and attach a BPF_PROG_TYPE_TRACING (fentry) program?
  Tried for real with a two-instruction program (`r0 = 0; exit`) on the
  running kernel's BTF id of the function: some kernels have BTF and
  trampolines but refuse the load (EPERM), others the attach. Compiling a
  probe with clang to ask the same costs a quarter of a second;
- how many runs of a loaded program did the kernel skip
  (`bpf_prog_info.recursion_misses`: a tracepoint hit while another BPF
  program was running on that CPU), which no perf buffer counts.

The attribute layouts are the kernel's UAPI (include/uapi/linux/bpf.h),
which is ABI: fields are only ever appended.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
import os
import platform
import struct

# include/uapi/linux/bpf.h
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_LOAD = 18
BPF_BTF_GET_FD_BY_ID = 19
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
BPF_TRACE_FEXIT = 25

# union bpf_attr, the BPF_PROG_LOAD part: byte offsets of the fields used
_LOAD_PROG_TYPE, _LOAD_INSN_CNT, _LOAD_INSNS, _LOAD_LICENSE = 0, 4, 8, 16
_LOAD_LOG_LEVEL, _LOAD_LOG_SIZE, _LOAD_LOG_BUF = 24, 28, 32
_LOAD_KERN_VERSION, _LOAD_PROG_NAME = 40, 48
_LOAD_EXPECTED_ATTACH_TYPE, _LOAD_PROG_BTF_FD, _LOAD_FUNC_INFO_REC_SIZE, _LOAD_FUNC_INFO, _LOAD_FUNC_INFO_CNT = 68, 72, 76, 80, 88
_LOAD_ATTACH_BTF_ID = 108
OBJ_NAME_LEN = 16  # BPF_OBJ_NAME_LEN, with the terminating NUL
_ATTR_SIZE = 128
# struct bpf_prog_info: the size up to and including recursion_misses (5.12+)
PROG_INFO_RUN_TIME_NS, PROG_INFO_RUN_CNT, PROG_INFO_RECURSION_MISSES = 192, 200, 208
_PROG_INFO_SIZE = 216

# struct bpf_map_info (4.13+; btf fields 4.18+)
_MAP_INFO_SIZE = 88
_MAP_INFO_BTF_ID = 64
# struct bpf_prog_info: btf_id and the func_info records (5.0+)
PROG_INFO_BTF_ID, PROG_INFO_FUNC_INFO_REC_SIZE, PROG_INFO_FUNC_INFO, PROG_INFO_NR_FUNC_INFO = 128, 132, 136, 144
# struct bpf_btf_info
_BTF_INFO_SIZE = 16

# r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
_RETURN_0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "ppc64": 361, "s390x": 351,
            "i686": 357, "i386": 357, "armv7l": 386, "armv6l": 386}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(cmd, attr): the result, or -errno."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return -38  # ENOSYS: an architecture this module has no number for
    r = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    return r if r >= 0 else -ctypes.get_errno()


def _put(buf: ctypes.Array, off: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, buf, off, value)


class BPFSysError(OSError):
    """A bpf(2) command failed; `detail` is the kernel's log where it gave one."""

    def __init__(self, what: str, err: int, detail: str = ""):
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))


def _info(fd: int, size: int, fill: Callable[[ctypes.Array], None] | None = None) -> tuple[ctypes.Array, int]:
    """BPF_OBJ_GET_INFO_BY_FD: the info struct and how much of it the kernel filled."""
    info = ctypes.create_string_buffer(size)
    if fill is not None:
        fill(info)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, 0, "I", fd)
    _put(attr, 4, "I", size)
    _put(attr, 8, "Q", ctypes.addressof(info))
    r = _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if r < 0:
        raise BPFSysError("reading a BPF object's info", -r)
    return info, struct.unpack_from("I", attr, 4)[0]


def map_info(map_fd: int) -> dict:
    """What a map was created with: type, key and value sizes, max_entries,
    flags, name, and its BTF (btf_id, key and value type ids; 0 when none)."""
    info, got = _info(map_fd, _MAP_INFO_SIZE)
    typ, _id, key, value, entries, flags = struct.unpack_from("6I", info, 0)  # type, id, key_size, ...
    name = info.raw[24:40].split(b"\0", 1)[0].decode("ascii", "replace")
    btf_id, key_tid, value_tid = (struct.unpack_from("3I", info, _MAP_INFO_BTF_ID) if got >= _MAP_INFO_BTF_ID + 12
                                  else (0, 0, 0))
    return {"type": typ, "key_size": key, "value_size": value, "max_entries": entries, "flags": flags,
            "name": name, "btf_id": btf_id, "btf_key_type_id": key_tid, "btf_value_type_id": value_tid}


def prog_btf_id(prog_fd: int) -> int:
    """The id of the BTF a loaded program carries (0: none)."""
    info, got = _info(prog_fd, _PROG_INFO_SIZE)
    return struct.unpack_from("I", info, PROG_INFO_BTF_ID)[0] if got >= PROG_INFO_BTF_ID + 4 else 0


def btf_bytes(btf_id: int) -> bytes:
    """The raw BTF the kernel holds under this id (as it was loaded)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, 0, "I", btf_id)
    fd = _bpf(BPF_BTF_GET_FD_BY_ID, attr)
    if fd < 0:
        raise BPFSysError(f"opening BTF {btf_id}", -fd)
    try:
        info, _ = _info(fd, _BTF_INFO_SIZE)
        size = struct.unpack_from("I", info, 8)[0]
        data = ctypes.create_string_buffer(size)
        _info(fd, _BTF_INFO_SIZE, lambda i: (_put(i, 0, "Q", ctypes.addressof(data)), _put(i, 8, "I", size)))
        return data.raw
    finally:
        os.close(fd)


def btf_load(data: bytes) -> int:
    """Load BTF (a program's or a map's types): its fd."""
    blob = ctypes.create_string_buffer(data, len(data))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, 0, "Q", ctypes.addressof(blob))
    _put(attr, 16, "I", len(data))
    fd = _bpf(BPF_BTF_LOAD, attr)
    if fd < 0:
        raise BPFSysError("loading BTF", -fd)
    return fd


def _name(buf: ctypes.Array, off: int, name: str) -> None:
    raw = "".join(c if c.isalnum() or c in "_." else "_" for c in name).encode()[: OBJ_NAME_LEN - 1]
    buf[off:off + len(raw)] = raw


def map_create(typ: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str,
               btf_fd: int = -1, key_tid: int = 0, value_tid: int = 0) -> int:
    """BPF_MAP_CREATE: the new map's fd."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    for off, value in ((0, typ), (4, key_size), (8, value_size), (12, max_entries), (16, flags)):
        _put(attr, off, "I", value)
    _name(attr, 28, name)
    if btf_fd >= 0 and value_tid:
        _put(attr, 48, "I", btf_fd)
        _put(attr, 52, "I", key_tid)
        _put(attr, 56, "I", value_tid)
    fd = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        raise BPFSysError(f"creating map {name}", -fd)
    return fd


def prog_load(prog_type: int, insns: bytes, license_: bytes, kern_version: int, name: str,
              btf_fd: int = -1, func_type_id: int = 0, expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """BPF_PROG_LOAD of one program (no subprograms): its fd. With BTF, its
    one func_info record names it (bpftool shows the full name). A refusal
    carries the verifier's last words. attach_btf_id: the vmlinux BTF id of
    the function a tracing (fentry/fexit) program attaches to."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_)
    log = ctypes.create_string_buffer(1 << 16)
    func_info = ctypes.create_string_buffer(struct.pack("<II", 0, func_type_id))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, _LOAD_PROG_TYPE, "I", prog_type)
    _put(attr, _LOAD_INSN_CNT, "I", len(insns) // 8)
    _put(attr, _LOAD_INSNS, "Q", ctypes.addressof(code))
    _put(attr, _LOAD_LICENSE, "Q", ctypes.addressof(lic))
    _put(attr, _LOAD_KERN_VERSION, "I", kern_version)
    _name(attr, _LOAD_PROG_NAME, name)
    _put(attr, _LOAD_EXPECTED_ATTACH_TYPE, "I", expected_attach_type)
    if attach_btf_id:
        _put(attr, _LOAD_ATTACH_BTF_ID, "I", attach_btf_id)
    if btf_fd >= 0 and func_type_id:
        _put(attr, _LOAD_PROG_BTF_FD, "I", btf_fd)
        _put(attr, _LOAD_FUNC_INFO_REC_SIZE, "I", 8)
        _put(attr, _LOAD_FUNC_INFO, "Q", ctypes.addressof(func_info))
        _put(attr, _LOAD_FUNC_INFO_CNT, "I", 1)
    fd = _bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        return fd
    # again with the verifier's log, only to say why (a log costs the verifier time)
    _put(attr, _LOAD_LOG_LEVEL, "I", 1)
    _put(attr, _LOAD_LOG_SIZE, "I", len(log))
    _put(attr, _LOAD_LOG_BUF, "Q", ctypes.addressof(log))
    again = _bpf(BPF_PROG_LOAD, attr)
    if again >= 0:
        return again
    lines = [x for x in log.value.decode("utf-8", "replace").strip().splitlines() if x.strip()]
    raise BPFSysError(f"loading program {name}", -fd, lines[-1] if lines else "")


def fentry_loads(btf_id: int) -> tuple[bool, str]:
    """Load an empty fentry program on the function with this vmlinux BTF
    id, attach it, and let it go: (True, "") or (False, why)."""
    insns = ctypes.create_string_buffer(_RETURN_0, len(_RETURN_0))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, _LOAD_PROG_TYPE, "I", BPF_PROG_TYPE_TRACING)
    _put(attr, _LOAD_INSN_CNT, "I", len(_RETURN_0) // 8)
    _put(attr, _LOAD_INSNS, "Q", ctypes.addressof(insns))
    _put(attr, _LOAD_LICENSE, "Q", ctypes.addressof(license_))
    _put(attr, _LOAD_LOG_LEVEL, "I", 1)
    _put(attr, _LOAD_LOG_SIZE, "I", len(log))
    _put(attr, _LOAD_LOG_BUF, "Q", ctypes.addressof(log))
    _put(attr, _LOAD_EXPECTED_ATTACH_TYPE, "I", BPF_TRACE_FENTRY)
    _put(attr, _LOAD_ATTACH_BTF_ID, "I", btf_id)
    prog = _bpf(BPF_PROG_LOAD, attr)
    if prog < 0:
        verifier = log.value.decode("utf-8", "replace").strip().splitlines()
        why = os.strerror(-prog) + (f": {verifier[0]}" if verifier else "")  # the first line says why
        return False, f"the kernel refuses to load an fentry program ({why})"
    try:
        attr = ctypes.create_string_buffer(_ATTR_SIZE)  # raw_tracepoint: name = NULL, prog_fd
        _put(attr, 8, "I", prog)
        link = _bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
        if link < 0:
            return False, f"the kernel refuses to attach an fentry program ({os.strerror(-link)})"
        os.close(link)
        return True, ""
    finally:
        os.close(prog)


def prog_info(prog_fd: int) -> dict[str, int] | None:
    """run_time_ns, run_cnt (both 0 unless kernel.bpf_stats_enabled) and
    recursion_misses of a loaded program; None if the kernel will not say
    (a field None: this kernel's bpf_prog_info ends before it)."""
    if prog_fd < 0:
        return None
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)  # info: bpf_fd, info_len, info pointer
    _put(attr, 0, "I", prog_fd)
    _put(attr, 4, "I", _PROG_INFO_SIZE)
    _put(attr, 8, "Q", ctypes.addressof(info))
    if _bpf(BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
        return None
    got = struct.unpack_from("I", attr, 4)[0]  # what the kernel filled (older kernels: less)
    fields = {"run_time_ns": PROG_INFO_RUN_TIME_NS, "run_cnt": PROG_INFO_RUN_CNT,
              "recursion_misses": PROG_INFO_RECURSION_MISSES}
    # a field the kernel did not fill (recursion_misses before 5.12) is unknown, not 0
    return {name: struct.unpack_from("Q", info, off)[0] if off + 8 <= got else None for name, off in fields.items()}


class SkippedRuns:
    """Runs of the tracer's programs the kernel skipped (the sum of their
    recursion_misses): events nobody will ever see, which no perf buffer
    counts. `total` is None where the kernel does not say (before 5.12).
    `state_fds`: the state hook's programs, told apart (new() returns their
    skips and the others' separately)."""

    def __init__(self, prog_fds: list[int], state_fds: list[int] = (), covered: Callable[[], int] | None = None):
        self.prog_fds = prog_fds
        self.state_fds = set(state_fds)
        # the state hook's skipped runs that its twin ran (bpf/tracepoints.bpf.c): not lost
        self.covered = covered
        self._base = self._read()
        self.total = None if self._base is None else 0
        self._seen = self._base

    def _read(self) -> tuple[int, int] | None:
        """(state hook's recursion_misses less those its twin covered, the other programs')."""
        infos = {fd: prog_info(fd) for fd in self.prog_fds}
        if not infos or any(i is None or i["recursion_misses"] is None for i in infos.values()):
            return None
        state = sum(i["recursion_misses"] for fd, i in infos.items() if fd in self.state_fds)
        other = sum(i["recursion_misses"] for i in infos.values()) - state
        if self.covered is not None:
            state = max(0, state - self.covered())  # covered is read last: never ahead of the misses it covers
        return state, other

    def new(self) -> tuple[int, int]:
        """Runs skipped since the last call: (of the state hook, of the others)."""
        if self._seen is None:
            return 0, 0
        now = self._read()
        if now is None:
            return 0, 0
        state, other = max(0, now[0] - self._seen[0]), max(0, now[1] - self._seen[1])
        self._seen = now
        self.total += state + other
        return state, other
