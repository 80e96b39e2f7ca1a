"""Assemble the BPF program for this kernel and load it with bcc.

The source is a `.c` file under bpf/. What varies per kernel and per run is
passed as macros: field offsets and enum values (tracer/kernel/offsets.py), the
tracepoint fields present (tracer/kernel/hooks.py), the user's filters and map sizes.
With BTF, bcc compiles against the project's compat tree (bpf/compat) in a
fraction of a second; without BTF it compiles against the kernel's headers.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tracer.kernel import bpfsys, btfmemo, capabilities, objcache, offsets
from tracer.kernel.btf import BTF, KIND_FUNC, BTFError
from tracer.kernel.hooks import Plan
from tracer.pipeline.filters import AF_BY_NAME, Filters  # noqa: F401 - the program's filters
from tracer.resources import bpf_dir, compat_dir

TRACK_MAP_SIZE = 4096  # collisions in progress (LRU); TCPCOLLIDE_TRACK_MAP_SIZE sets another (track_map_size())
CONN_MAP_SIZE = 65536  # connecting sockets and their process (LRU)
COUNT_MAP_SIZE = 16384  # (network namespace, server port, lingering state) with collisions
NETNS_SET_SIZE = 1024  # `netns_allowed`: the namespaces of --container/--pod/--unit
# How long after a collision starts the hooks keep looking tuples up in
# `tracked` (map `tracking`), in jiffies: 30 s at HZ 1000, longer at lower
# HZ; user space keeps the window open while it has incidents open.
TRACKING_JIFFIES = 30_000
MAIN_SOURCE = "tcpcollide.bpf.c"
UAPI_DIRS = ("/usr/include", "/usr/include/x86_64-linux-gnu")  # Debian's linux-libc-dev


class BuildError(Exception):
    """The program cannot be built or loaded on this kernel."""


@dataclass
class KernelTypes:
    """Where kernel type information came from, and what it says."""

    source: str  # "btf:PATH" or "headers:PATH"
    defines: dict[str, int | str]
    tcp_states: dict[int, str]
    btf: btfmemo.AnsweredBTF | None = None  # its answers are kept on disk: save() once the start-up asked them

    def save(self) -> None:
        if self.btf is not None:
            self.btf.save()


def kernel_types(btf_path: str | None = None, source: str = "auto") -> KernelTypes:
    """Read offsets and enum values from BTF, else from kernel headers.
    source: "auto", or "btf" / "headers" to force one (an error if missing)."""
    path = btf_path or str(capabilities.SYSFS_BTF)
    if source != "headers" and (btf_path or capabilities.SYSFS_BTF.exists()):
        try:
            btf = btfmemo.load(path)
            return KernelTypes(f"btf:{path}", dict(offsets.btf_defines(btf)), offsets.tcp_states(btf), btf)
        except (BTFError, OSError) as e:
            if btf_path or source == "btf":
                raise BuildError(f"cannot use BTF from {path}: {e}") from e
        except offsets.OffsetError as e:
            raise BuildError(f"this kernel's BTF lacks what the tracer reads: {e}") from e
    if source == "btf":
        raise BuildError(f"no BTF at {path}: the kernel needs CONFIG_DEBUG_INFO_BTF")
    headers = capabilities.headers_dir()
    if headers is None and source == "headers":
        raise BuildError(f"no kernel headers at /lib/modules/{capabilities.release()}/build: install the headers package "
                         "for this kernel (Debian: linux-headers-$(uname -r))")
    if headers is None:
        raise BuildError(
            "no BTF (/sys/kernel/btf/vmlinux) and no kernel headers "
            f"(/lib/modules/{capabilities.release()}/build): enable CONFIG_DEBUG_INFO_BTF or install the headers package"
        )
    try:
        states = offsets.header_tcp_states(capabilities.header_include_dirs(headers))
    except offsets.OffsetError as e:
        raise BuildError(str(e)) from e
    return KernelTypes(f"headers:{headers}", dict(offsets.header_defines()), states)


def track_map_size() -> int:
    """How many collisions in progress at once the kernel side tracks (map
    `tracked`): TCPCOLLIDE_TRACK_MAP_SIZE (for a host that has more at once,
    or a test that wants the map full), else TRACK_MAP_SIZE."""
    value = os.environ.get("TCPCOLLIDE_TRACK_MAP_SIZE", "")
    if not value:
        return TRACK_MAP_SIZE
    if not value.isdigit() or not 16 <= int(value) <= 1 << 20:
        raise BuildError(f"TCPCOLLIDE_TRACK_MAP_SIZE={value!r}: a number of entries from 16 to {1 << 20}")
    return int(value)


@dataclass
class BuildSpec:
    text: str
    cflags: list[str]
    kernel_source: Path | None  # BCC_KERNEL_SOURCE (None: bcc finds the headers)
    source_file: str
    defines: dict[str, int | str] = field(default_factory=dict)
    kprobes: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, symbol, BPF function)
    header_dirs: list[Path] = field(default_factory=list)  # the kernel's include/ dirs (header path only)


def build_spec(plan: Plan, types: KernelTypes) -> BuildSpec:
    source = bpf_dir() / MAIN_SOURCE
    defines: dict[str, int | str] = {
        "TC_TRACK_MAP_SIZE": track_map_size(), "TC_CONN_MAP_SIZE": CONN_MAP_SIZE, "TC_COUNT_MAP_SIZE": COUNT_MAP_SIZE,
        "TC_TRACKING_J": TRACKING_JIFFIES, "TC_NETNS_SET_SIZE": NETNS_SET_SIZE,
    }
    defines.update(types.defines)
    defines.update(plan.defines())
    prelude = plan.prelude()
    if types.source.startswith("btf:"):
        cflags = ["-I", str(bpf_dir())]
        for d in UAPI_DIRS:
            cflags += ["-idirafter", d]
        ksrc: Path | None = compat_dir()
        header_dirs: list[Path] = []
    else:
        cflags = ["-I", str(bpf_dir())]
        prelude = "".join(f"#include <{h}>\n" for h in offsets.HEADER_INCLUDES) + "".join(
            f"#if __has_include(<{h}>)\n#include <{h}>\n#endif\n" for h in offsets.HEADER_OPTIONAL_INCLUDES)
        ksrc = None
        header_dirs = capabilities.header_include_dirs(Path(types.source.removeprefix("headers:")))
    cflags += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    text = prelude + _inline_local_includes(source)
    return BuildSpec(text, cflags, ksrc, source.name, defines, plan.kprobes(), header_dirs)


def _missing_uapi_structs(diagnostics: str, header_dirs: list[Path]) -> str:
    """Definitions, from the kernel's own uapi/linux/bpf.h, of the BPF uapi
    structs the compiler found incomplete.

    bcc compiles every program with its own copy of uapi/linux/bpf.h, frozen
    at bcc's release; a newer kernel's include/linux/bpf.h takes sizeof() of
    structs that copy lacks (struct bpf_wq since 6.10, bpf_task_work since
    6.18). Empty when nothing is missing or the definitions cannot be found."""
    names = sorted(set(re.findall(r"incomplete type '(?:const )?struct (bpf_\w+)'", diagnostics)))
    if not names:
        return ""
    paths = [d / "uapi" / "linux" / "bpf.h" for d in header_dirs]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return ""
    uapi = path.read_text(errors="replace")
    out = []
    for name in names:
        m = re.search(rf"^struct {name} \{{.*?^\}}[^;]*;", uapi, re.M | re.S)
        if m is None:
            return ""
        out.append(m.group(0) + "\n")
    return f"/* from {path}: missing in bcc's own copy */\n" + "".join(out)


_LOCAL_INCLUDE_RE = re.compile(r'\s*#include\s+"([\w./]+\.bpf\.[ch])"')


def _inline_local_includes(source: Path, root: Path | None = None, seen: tuple[Path, ...] = ()) -> str:
    """The source with its `#include "*.bpf.h"`/`"*.bpf.c"` lines replaced by
    the files, recursively (a path relative to the including file's directory).

    bcc rewrites map operations (`map.lookup()`, `events.perf_submit()`) only
    in the main translation unit, so the shared logic cannot be a real header.
    `#line` markers (paths relative to bpf/) keep compiler messages pointing
    at the right file."""
    source = source.resolve()
    root = root or source.parent
    name = source.relative_to(root).as_posix()
    if source in seen:
        raise BuildError(f"{name} includes itself (through {', '.join(p.name for p in seen)})")
    out = []
    for n, line in enumerate(source.read_text().splitlines(keepends=True), 1):
        m = _LOCAL_INCLUDE_RE.match(line)
        if m:
            out.append(_inline_local_includes(source.parent / m.group(1), root, seen + (source,)))
            out.append(f'#line {n + 1} "{name}"\n')
        else:
            out.append(line)
    return f'#line 1 "{name}"\n' + "".join(out)


@contextlib.contextmanager
def _kernel_source(path: Path | None):
    old = os.environ.get("BCC_KERNEL_SOURCE")
    if path is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = old


def import_bcc():
    try:
        import bcc  # noqa: PLC0415 - optional at import time: replay and unit tests need no bcc
    except ImportError as e:
        raise BuildError(
            "bcc is not importable: install Debian's python3-bpfcc and run with a Python that sees "
            "/usr/lib/python3/dist-packages (scripts/setup does both)"
        ) from e
    return bcc


@contextlib.contextmanager
def _captured_stderr():
    """Collect what libbcc, clang and the verifier write to fd 2 (they write
    to it directly, many lines at a time), so a failure becomes one line."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        captured: list[str] = []
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


def _first_error(diagnostics: str) -> str:
    for line in diagnostics.splitlines():
        if re.search(r"error|invalid|denied|not permitted|failed", line, re.I):
            return line.strip()
    return ""


def load_cached(spec: BuildSpec) -> tuple[object, objcache.Outcome]:
    """Load the object a compile of this spec made before, kept on disk
    (tracer/kernel/objcache.py), else compile and load it (load()) and keep
    it for the next start. Returns the BPF object and what the cache did."""
    obj, outcome = objcache.find(spec)
    if obj is not None:
        b = None
        with _captured_stderr():
            try:
                b = objcache.load(obj)
                _attach_kprobes(b, spec)
                return b, outcome
            except Exception as e:  # noqa: BLE001 - bcc raises bare Exception; the compile below decides
                err = e
        if b is not None:
            b.cleanup()
        outcome = objcache.Outcome("failed", outcome.path, f"loading the cached object: {err}"[:300])
    b = load(spec)
    if outcome.state in ("off", "refused"):
        return b, outcome
    stored = objcache.store(b, spec)
    if outcome.state == "miss":
        return b, stored
    if stored.state == "stored":  # corrupt or failed: replaced by this compile
        outcome.why = f"{outcome.why}; replaced"
    return b, outcome


def _attach_kprobes(b, spec: BuildSpec) -> None:
    for kind, symbol, fn in spec.kprobes:
        attach = b.attach_kretprobe if kind == "kretprobe" else b.attach_kprobe
        attach(event=symbol.encode(), fn_name=fn.encode())


def load(spec: BuildSpec):
    """Compile and load. bcc attaches the tracepoint and fentry programs as it
    loads; the kprobes are attached here, to the symbols selection resolved.
    On the header path, a compile that fails only because bcc's uapi copy is
    older than the kernel's headers is retried once with the kernel's
    definitions of the missing structs."""
    try:
        return _load(spec)
    except _CompileFailed as failed:
        extra = _missing_uapi_structs(failed.diagnostics, spec.header_dirs) if spec.header_dirs else ""
        if not extra:
            raise failed.error from None
    spec.text = extra + spec.text
    try:
        return _load(spec)
    except _CompileFailed as failed:
        raise failed.error from None


class _CompileFailed(Exception):
    def __init__(self, error: BuildError, diagnostics: str):
        super().__init__(str(error))
        self.error, self.diagnostics = error, diagnostics


def _load(spec: BuildSpec):
    bcc = import_bcc()
    b = None
    with _kernel_source(spec.kernel_source), _captured_stderr() as diag:
        try:
            b = bcc.BPF(text=spec.text.encode(), cflags=spec.cflags)
            _attach_kprobes(b, spec)
            return b
        except Exception as e:  # bcc raises bare Exception for compile, load and attach failures
            err = e
    if b is not None:
        b.cleanup()
    detail = _first_error(diag[0])
    raise _CompileFailed(
        BuildError(f"loading {spec.source_file} failed: {err}" + (f" ({detail})" if detail else "")), diag[0])


FENTRY_PROBE_FUNCTION = "tcp_set_state"  # attached to by the fentry backend


def fentry_probe(types: KernelTypes | None = None) -> tuple[bool, str]:
    """Do fentry programs load and attach here? Tried for real: some kernels
    have BTF and trampolines but refuse BPF_PROG_TYPE_TRACING (EPERM). An
    empty program loaded with bpf(2) directly (tracer/kernel/bpfsys.py) answers in
    well under a millisecond, where compiling one with clang would cost a
    good part of the start-up."""
    if platform.machine() != "x86_64":
        return False, f"bcc attaches fentry programs on x86_64 only (this is {platform.machine()})"
    btf = types.btf if types is not None and types.source == f"btf:{capabilities.SYSFS_BTF}" else None
    if btf is None:
        try:
            btf = BTF.load(str(capabilities.SYSFS_BTF))
        except BTFError:
            return False, f"fentry needs the kernel's own BTF ({capabilities.SYSFS_BTF})"
    ids = btf.find_type_ids(FENTRY_PROBE_FUNCTION, {KIND_FUNC})
    if not ids:
        return False, f"the kernel's BTF has no function {FENTRY_PROBE_FUNCTION}"
    return bpfsys.fentry_loads(ids[0])
