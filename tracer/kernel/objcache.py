"""The compiled BPF object, kept on disk so that a start on a kernel and with
options seen before skips bcc's compile (most of the start-up).

After bcc compiled and loaded the program, `store()` keeps what loading it
again needs: each function's instructions as the compile left them, with the
instructions that name a map marked; the maps' definitions (type, sizes,
flags, name, BTF type ids) and the layouts of their keys and values (bcc's
JSON descriptions); the BTF bcc generated for the program (so that bpftool
shows full program names and typed maps); the license and kernel version.
`load()` creates maps, BTF and programs from that with bpf(2)
(tracer/kernel/bpfsys.py) and hands back a `CachedBPF`: bcc's own BPF class
(tables, perf buffer, attach and detach, cleanup) over those file
descriptors. The verifier checks the instructions at every load, as it does
for bcc's.

The key is everything the instructions depend on: the program text after
inlining, the compiler flags (they carry every offset and enum value read from
the kernel's BTF or headers, the filters and the map sizes), the compat
headers or the kernel headers' configuration, bcc's version, the running
kernel (release, /proc/version, a hash of its BTF), the possible CPUs (a perf
event array's size), the tracer's version and this format's. Another key is
another file: a stale object cannot be found. A file that does not parse or
whose checksum does not match is a miss (`corrupt`), replaced by the next
compile.

Where: TCPCOLLIDE_CACHE_DIR, else /var/cache/tcpcollide-trace; an empty
TCPCOLLIDE_CACHE_DIR turns the cache off. The instructions are loaded into the
kernel by root, so a file (and its directory) that is not root's, or that
others can write, is never read (`refused`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import resource
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tracer import __version__
from tracer.kernel import bpfsys, capabilities
from tracer.kernel.btf import BTF, KIND_FUNC, BTFError

FORMAT = 1
DEFAULT_DIR = "/var/cache/tcpcollide-trace"
KEEP = 16  # objects kept; the oldest go first (a filter's value is part of the key)
# function name prefixes bcc attaches at load (BPF._trace_autoload), and how
_AUTOLOAD = (("raw_tracepoint__", "raw"), ("tracepoint__", "tp"), ("kfunc__", "fentry"), ("kretfunc__", "fexit"))
# fentry/fexit programs are loaded with the attach type and the vmlinux BTF id
# of their function, both found at load time as bcc finds them (libbpf)
_TRACING_ATTACH = (("kfunc__", bpfsys.BPF_TRACE_FENTRY), ("kretfunc__", bpfsys.BPF_TRACE_FEXIT))
# programs this cache cannot load again (LSM: not used; bcc's own kprobe__
# autoload names): such objects are not stored
_UNSUPPORTED = (b"lsm__", b"kprobe__", b"kretprobe__")
_LD_IMM64, _CALL = 0x18, 0x85
_PSEUDO_MAP_FD = 1


@dataclass
class Outcome:
    """What the cache did at this start (the `ready` record's `object_cache`)."""

    state: str  # hit | stored | miss | off | corrupt | refused | unsupported | failed
    path: str | None = None
    why: str | None = None

    def as_dict(self) -> dict:
        return {"state": self.state, "path": self.path, **({"why": self.why} if self.why else {})}


def cache_dir() -> Path | None:
    value = os.environ.get("TCPCOLLIDE_CACHE_DIR")
    if value is None:
        return Path(DEFAULT_DIR)
    return Path(value) if value else None


def _file_digest(h, path: Path) -> None:
    with contextlib.suppress(OSError):
        h.update(path.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")


def key(spec) -> str:
    """The cache key of a build spec (tracer/kernel/program.py BuildSpec) on this kernel."""
    h = hashlib.sha256()
    for part in (f"format {FORMAT}", f"tracer {__version__}", f"bcc {_bcc_version()}", platform.machine(),
                 platform.release(), _read("/proc/version"), _read("/sys/devices/system/cpu/possible"),
                 spec.source_file, spec.text, "\0".join(spec.cflags), str(spec.kernel_source)):
        h.update(part.encode() + b"\0")
    _file_digest(h, capabilities.SYSFS_BTF)
    if spec.kernel_source is not None:  # the compat tree the compile read
        for path in sorted(Path(spec.kernel_source).rglob("*")):
            if path.is_file():
                _file_digest(h, path)
    for d in spec.header_dirs:  # the kernel headers' configuration
        _file_digest(h, Path(d) / "generated" / "autoconf.h")
        _file_digest(h, Path(d) / "generated" / "utsrelease.h")
    return h.hexdigest()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _bcc_version() -> str:
    try:
        import bcc  # noqa: PLC0415

        return getattr(bcc, "__version__", "?")
    except ImportError:
        return "none"


def untrusted(path: Path) -> str | None:
    """Why a file or directory of the cache may not be read as root's (None: it may)."""
    try:
        st = path.stat()
    except OSError as e:
        return e.strerror
    if st.st_uid != 0:
        return f"{path} is not owned by root"
    if st.st_mode & 0o022:
        return f"{path} is writable by others"
    return None


# -- store ---------------------------------------------------------------------


def capture(b) -> dict | None:
    """What loading bcc's compiled object `b` again needs, or None when this
    cache cannot load it again (fentry/LSM programs, subprograms, map
    references of a kind it does not patch)."""
    from bcc import libbcc  # noqa: PLC0415

    lib = libbcc.lib
    _declare(lib)
    module = b.module
    maps, by_fd = [], {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i)
        fd = lib.bpf_table_fd_id(module, i)
        info = bpfsys.map_info(fd)
        maps.append({**info, "table": name.decode(),
                     "key_desc": (lib.bpf_table_key_desc(module, name) or b"").decode(),
                     "leaf_desc": (lib.bpf_table_leaf_desc(module, name) or b"").decode()})
        by_fd[fd] = i
    funcs = []
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        if name.startswith(_UNSUPPORTED):
            return None
        insns = b.dump_func(name)
        relocs = []
        n = 0
        while n < len(insns) // 8:
            code, regs, _off, imm = struct.unpack_from("<BBhi", insns, n * 8)
            src = regs >> 4
            if code == _LD_IMM64:
                if src == _PSEUDO_MAP_FD:
                    if imm not in by_fd:
                        return None
                    relocs.append([n, by_fd[imm]])
                elif src != 0:
                    return None
                n += 2
                continue
            if code == _CALL and src != 0:  # a BPF-to-BPF call or a kfunc: not one program per function
                return None
            n += 1
        funcs.append({"name": name.decode(), "insns": base64.b64encode(insns).decode(), "relocs": relocs})
    btf = b""
    btf_ids = {m["btf_id"] for m in maps if m["btf_id"]}
    btf_ids |= {bpfsys.prog_btf_id(f.fd) for f in b.funcs.values()} - {0}
    if len(btf_ids) == 1:
        btf = bpfsys.btf_bytes(btf_ids.pop())
    return {"format": FORMAT, "license": lib.bpf_module_license(module).decode(),
            "kern_version": int(lib.bpf_module_kern_version(module)),
            "btf": base64.b64encode(btf).decode(), "maps": maps, "funcs": funcs}


def _declare(lib) -> None:
    """Argument types of the libbcc calls bcc's Python side does not declare."""
    import ctypes as ct  # noqa: PLC0415

    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_ulonglong, [ct.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]
    lib.bpf_table_fd_id.restype, lib.bpf_table_fd_id.argtypes = ct.c_int, [ct.c_void_p, ct.c_ulonglong]


def store(b, spec) -> Outcome:
    """Keep bcc's compiled object `b` for the next start with the same key."""
    where = cache_dir()
    if where is None:
        return Outcome("off")
    try:
        obj = capture(b)
    except (OSError, ValueError) as e:
        return Outcome("failed", None, f"reading the compiled object back: {e}")
    if obj is None:
        return Outcome("unsupported", None, "this program's kind is compiled at every start")
    path = where / f"obj-{key(spec)}.json"
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    data = json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "object": body}).encode()
    try:
        why = write(path, data)
    except OSError as e:
        return Outcome("failed", str(path), f"writing the object: {e.strerror or e}")
    if why is not None:
        return Outcome("refused", str(path), why)
    return Outcome("stored", str(path))


def write(path: Path, data: bytes) -> str | None:
    """Write a file of the cache (named KIND-KEY.json) whole or not at all (a
    reader never sees half of it), in a directory made private if it is new;
    then keep the KEEP newest files of its kind. Returns why it was not written
    (the directory is not trusted), None when it was; OSError as it comes."""
    where = path.parent
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = untrusted(where)
    if why is not None:
        return why
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    kind = path.name.split("-", 1)[0]  # obj-KEY.json, btf-KEY.json: KEEP of each
    files = sorted(where.glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
    return None


# -- load ----------------------------------------------------------------------


def find(spec) -> tuple[dict | None, Outcome]:
    """The cached object for this spec, if any."""
    where = cache_dir()
    if where is None:
        return None, Outcome("off")
    path = where / f"obj-{key(spec)}.json"
    if not path.exists():
        return None, Outcome("miss", str(path))
    why = untrusted(where) or untrusted(path)
    if why is not None:
        return None, Outcome("refused", str(path), why)
    try:
        outer = json.loads(path.read_bytes())
        body = outer["object"]
        if hashlib.sha256(body.encode()).hexdigest() != outer["sha256"]:
            raise ValueError("checksum mismatch")
        obj = json.loads(body)
        if obj.get("format") != FORMAT:
            raise ValueError(f"format {obj.get('format')}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, Outcome("corrupt", str(path), str(e)[:200])
    return obj, Outcome("hit", str(path))


def _bcc_class():
    from bcc import BPF  # noqa: PLC0415

    return BPF


class _TableLib:
    """bcc's table module asks its module for a table's type, flags and size
    when it builds a table object; a cached object has no module, so those
    three answers come from the cached definitions (everything else goes to
    libbcc)."""

    def __init__(self, real, maps: list[dict]):
        self._real, self._maps = real, maps

    def __getattr__(self, name):
        return getattr(self._real, name)

    def bpf_table_type_id(self, _module, map_id):
        return self._maps[map_id]["type"]

    def bpf_table_flags_id(self, _module, map_id):
        return self._maps[map_id]["flags"]

    def bpf_table_max_entries_id(self, _module, map_id):
        return self._maps[map_id]["max_entries"]


def _vmlinux_btf_id(func: str, attach_type: int) -> int:
    """The vmlinux BTF id of a kernel function, as bcc finds it for an
    fentry/fexit program (libbpf's libbpf_find_vmlinux_btf_id, in libbcc)."""
    from bcc import libbcc  # noqa: PLC0415 - bcc is imported only where a program is loaded

    f = libbcc.lib.libbpf_find_vmlinux_btf_id
    f.restype, f.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]
    return f(func.encode(), attach_type)


def _raise_memlock() -> None:
    """Before Linux 5.11 BPF maps and programs are charged to RLIMIT_MEMLOCK
    (since, to the memory cgroup): raise it as bcc does before it loads
    anything. Without CAP_SYS_RESOURCE it stays as it is (newer kernels do
    not need it)."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass


def load(obj: dict):
    """A bcc BPF object over maps and programs made from a cached object, its
    tracepoint programs attached as bcc would have attached them."""
    BPF = _bcc_class()
    _raise_memlock()

    class CachedBPF(BPF):
        """bcc's BPF over a cached object: no module, no compile."""

        def __init__(self, obj: dict):  # noqa: PLR0912 - the attributes bcc's __init__ sets
            self.kprobe_fds, self.uprobe_fds, self.tracepoint_fds, self.raw_tracepoint_fds = {}, {}, {}, {}
            self.kfunc_entry_fds, self.kfunc_exit_fds, self.lsm_fds = {}, {}, {}
            self.perf_buffers, self.open_perf_events = {}, {}
            self._ringbuf_manager = None
            self.tracefile = None
            self.debug = 0
            self.funcs, self.tables = {}, {}
            self.module = None
            self._obj = obj
            self._map_fds: list[int] = []
            self._btf_fd = -1
            self._func_types: dict[str, int] = {}
            atexit.register(self.cleanup)
            try:
                self._create()
                for f in obj["funcs"]:
                    for prefix, kind in _AUTOLOAD:
                        if f["name"].startswith(prefix):
                            fn = f["name"].encode()
                            if kind == "raw":
                                self.attach_raw_tracepoint(tp=fn[len(prefix):], fn_name=fn)
                            elif kind == "fentry":
                                self.attach_kfunc(fn_name=fn)
                            elif kind == "fexit":
                                self.attach_kretfunc(fn_name=fn)
                            else:
                                self.attach_tracepoint(tp=fn[len(prefix):].replace(b"__", b":"), fn_name=fn)
                            break
            except BaseException:
                self.cleanup()
                raise

        def _create(self) -> None:
            btf = base64.b64decode(self._obj["btf"])
            if btf:
                try:
                    self._btf_fd = bpfsys.btf_load(btf)
                    parsed = BTF.from_bytes(btf)
                    for f in self._obj["funcs"]:
                        ids = parsed.find_type_ids(f["name"], {KIND_FUNC})
                        if ids:
                            self._func_types[f["name"]] = ids[0]
                except (OSError, BTFError):
                    self._btf_fd = -1  # programs and maps without their BTF: they work the same
            for m in self._obj["maps"]:
                self._map_fds.append(bpfsys.map_create(
                    m["type"], m["key_size"], m["value_size"], m["max_entries"], m["flags"], m["name"],
                    self._btf_fd, m["btf_key_type_id"], m["btf_value_type_id"]))

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            name = func_name.decode() if isinstance(func_name, bytes) else func_name
            key = name.encode()
            if key in self.funcs:
                return self.funcs[key]
            f = next((f for f in self._obj["funcs"] if f["name"] == name), None)
            if f is None:
                raise Exception(f"Unknown program {name}")
            insns = bytearray(base64.b64decode(f["insns"]))
            for n, index in f["relocs"]:
                struct.pack_into("<i", insns, n * 8 + 4, self._map_fds[index])
            btf_id = 0
            if prog_type == BPF.TRACING:
                prefix, attach_type = next(((p, t) for p, t in _TRACING_ATTACH if name.startswith(p)), ("", -1))
                if not prefix:
                    raise Exception(f"Failed to load BPF program {name}: not an fentry or fexit program")
                btf_id = _vmlinux_btf_id(name[len(prefix):], attach_type)
                if btf_id < 0:
                    raise Exception(f"Failed to load BPF program {name}: no {name[len(prefix):]} in vmlinux BTF")
            try:
                fd = bpfsys.prog_load(prog_type, bytes(insns), self._obj["license"].encode(),
                                      self._obj["kern_version"], name, self._btf_fd,
                                      self._func_types.get(name, 0), max(attach_type, 0), btf_id)
            except OSError as e:
                raise Exception(f"Failed to load BPF program {name}: {e.strerror}") from None
            fn = BPF.Function(self, key, fd)
            self.funcs[key] = fn
            return fn

        def get_table(self, name, keytype=None, leaftype=None, reducer=None):
            from bcc import table as bcc_table  # noqa: PLC0415

            text = name.decode() if isinstance(name, bytes) else name
            index = next((i for i, m in enumerate(self._obj["maps"]) if m["table"] == text), None)
            if index is None:
                raise KeyError(name)
            m = self._obj["maps"][index]
            keytype = keytype or BPF._decode_table_type(json.loads(m["key_desc"]))
            leaftype = leaftype or BPF._decode_table_type(json.loads(m["leaf_desc"]))
            real = bcc_table.lib
            bcc_table.lib = _TableLib(real, self._obj["maps"])
            try:
                return bcc_table.Table(self, index, self._map_fds[index], keytype, leaftype, text.encode(),
                                       reducer=reducer)
            finally:
                bcc_table.lib = real

        def dump_func(self, func_name):
            name = func_name.decode() if isinstance(func_name, bytes) else func_name
            f = next((f for f in self._obj["funcs"] if f["name"] == name), None)
            if f is None:
                raise Exception(f"Unknown program {name}")
            return base64.b64decode(f["insns"])

        def close(self):
            for name, fn in list(self.funcs.items()):
                os.close(fn.fd)
                del self.funcs[name]
            for fd in self._map_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._map_fds = []
            if self._btf_fd >= 0:
                os.close(self._btf_fd)
                self._btf_fd = -1

    return CachedBPF(obj)
