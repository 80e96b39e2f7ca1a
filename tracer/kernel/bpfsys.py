"""The few bpf(2) commands the tracer issues itself, without bcc or clang.

bcc does the real loading. This module answers two questions cheaply:

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
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24

# union bpf_attr, the BPF_PROG_LOAD part: byte offsets of the fields used
_LOAD_PROG_TYPE, _LOAD_INSN_CNT, _LOAD_INSNS, _LOAD_LICENSE = 0, 4, 8, 16
_LOAD_LOG_LEVEL, _LOAD_LOG_SIZE, _LOAD_LOG_BUF = 24, 28, 32
_LOAD_EXPECTED_ATTACH_TYPE, _LOAD_ATTACH_BTF_ID = 68, 108
_ATTR_SIZE = 128
# struct bpf_prog_info: the size up to and including recursion_misses (5.12+)
PROG_INFO_RUN_TIME_NS, PROG_INFO_RUN_CNT, PROG_INFO_RECURSION_MISSES = 192, 200, 208
_PROG_INFO_SIZE = 216

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
    recursion_misses of a loaded program; None if the kernel will not say."""
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
    return {name: struct.unpack_from("Q", info, off)[0] if off + 8 <= got else 0 for name, off in fields.items()}


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
        if not infos or any(i is None for i in infos.values()):
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
