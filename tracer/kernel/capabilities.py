"""What the running kernel offers the tracer, found by looking, never assumed.

Pure reads of /proc and /sys (plus tracefs, which it can mount, and one wait for an RCU grace
period); no BPF here.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
SYSFS_BTF = Path("/sys/kernel/btf/vmlinux")


class KernelError(Exception):
    """The kernel cannot support the tracer; the message says why and what to do."""


def release() -> str:
    return os.uname().release


def tracefs(mount: bool = True) -> Path:
    """The tracefs mount point; mounts it on /sys/kernel/tracing when needed."""
    for p in TRACEFS_CANDIDATES:
        if (p / "events").is_dir():
            return p
    if mount:
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS_CANDIDATES[0])],
                       capture_output=True, check=False)
        if (TRACEFS_CANDIDATES[0] / "events").is_dir():
            return TRACEFS_CANDIDATES[0]
    raise KernelError("tracefs is not mounted and could not be mounted: mount -t tracefs tracefs /sys/kernel/tracing")


@dataclass(frozen=True)
class TracepointFormat:
    """A tracepoint's fields as its tracefs `format` file lists them."""

    name: str  # "category:event"
    fields: dict[str, str] = field(default_factory=dict)  # field name -> C type

    def enum_types(self) -> set[str]:
        return {m for t in self.fields.values() for m in re.findall(r"enum\s+(\w+)", t)}


_FORMAT_FIELD_RE = re.compile(r"field:(.+?)\s+(\w+)(\[\d*\])?;\s*offset:")


def tracepoint_format(category: str, event: str, root: Path | None = None) -> TracepointFormat | None:
    """Parse events/CATEGORY/EVENT/format; None when the tracepoint does not exist."""
    path = (root or tracefs()) / "events" / category / event / "format"
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = {}
    for ctype, name, _arr in _FORMAT_FIELD_RE.findall(text):
        if not name.startswith("common_"):
            fields[name] = ctype.strip()
    return TracepointFormat(f"{category}:{event}", fields)


def kernel_config() -> dict[str, str]:
    """CONFIG_* values from /proc/config.gz or /boot/config-RELEASE ({} if neither)."""
    text = ""
    try:
        text = gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        try:
            text = Path(f"/boot/config-{release()}").read_text()
        except OSError:
            return {}
    return dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))


def jiffies_hz(config: dict[str, str] | None = None) -> int | None:
    """The kernel's HZ (jiffies per second), or None when it cannot be known."""
    value = (config if config is not None else kernel_config()).get("CONFIG_HZ")
    return int(value) if value and value.isdigit() else None


def headers_dir() -> Path | None:
    """The kernel header tree for the running kernel (what bcc compiles
    against: /lib/modules/RELEASE/build), if installed."""
    build = Path(f"/lib/modules/{release()}/build")
    return build if header_include_dirs(build) else None


def header_include_dirs(build: Path) -> list[Path]:
    """The include/ directories of a header tree holding the kernel's own
    headers: build/include, and, where the distribution splits the tree (Debian:
    the arch part in build, the common part in source), source/include too."""
    dirs = [build / "include", build.parent / "source" / "include"]
    return [d for d in dirs if (d / "linux").is_dir()]


def lockdown() -> str:
    path = Path("/sys/kernel/security/lockdown")
    if not path.exists() and os.geteuid() == 0 and Path("/sys/kernel/security").is_dir():
        subprocess.run(["mount", "-t", "securityfs", "securityfs", "/sys/kernel/security"], capture_output=True)
    try:
        text = path.read_text()
    except OSError:
        return "unknown (no /sys/kernel/security/lockdown)"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def netns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def require_root(why: str = "it loads BPF programs") -> None:
    if os.geteuid() != 0:
        raise KernelError(f"tcpcollide-trace must run as root ({why})")


# The capabilities the tracer needs, measured (setpriv --bounding-set) on this
# project's kernels: what each buys, and whether the tracer can run without it.
# CAP_BPF and CAP_PERFMON are what loading and attaching need on Linux >= 5.8;
# CAP_SYS_ADMIN, needed anyway (the self-test's private network namespace,
# setns into other namespaces for sock_diag), grants both on every kernel.
# The unit's CapabilityBoundingSet= (tracer/system/tcpcollide-trace.service) and the
# DaemonSet's capabilities (tracer/system/daemonset.yaml) are this set;
# tests/test_systemd.py and tests/test_image.py hold them together.
CAPABILITIES = {  # name: (bit, what is lost without it, fatal)
    "CAP_SYS_ADMIN": (21, "the self-test's private network namespace (unshare) and the lookups in other "
                          "namespaces (setns) fail, and with neither CAP_BPF nor CAP_PERFMON nothing loads: the "
                          "tracer cannot run", True),
    "CAP_NET_ADMIN": (12, "the self-test cannot bring up its namespace's loopback: the tracer cannot run (but with "
                          "--no-selftest); demo cannot make its namespace", True),
    "CAP_SYS_PTRACE": (19, "the process holding a socket cannot be named when it runs as another user (its "
                           "/proc/PID/fd is not readable): the culprit is `not_held`", False),
    "CAP_DAC_READ_SEARCH": (2, "the /proc/PID/fd of another user's processes cannot be listed: their sockets' "
                               "owners cannot be named", False),
    "CAP_BPF": (39, "nothing, where CAP_SYS_ADMIN is there (it grants the same)", False),
    "CAP_PERFMON": (38, "nothing, where CAP_SYS_ADMIN is there (it grants the same)", False),
}


def effective_capabilities(status: str | None = None) -> set[str]:
    """The tracer's capabilities (of CAPABILITIES) in effect now."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    eff = next((int(line.split()[1], 16) for line in text.splitlines() if line.startswith("CapEff:")), 0)
    return {name for name, (bit, _, _) in CAPABILITIES.items() if eff >> bit & 1}


def missing_capabilities(have: set[str] | None = None) -> list[dict]:
    """The capabilities the tracer lacks, what each costs, and whether it
    cannot run without it (CAP_BPF and CAP_PERFMON are not missing where
    CAP_SYS_ADMIN stands in for them)."""
    have = effective_capabilities() if have is None else have
    out = []
    for name, (_, cost, fatal) in CAPABILITIES.items():
        if name in have or (name in ("CAP_BPF", "CAP_PERFMON") and "CAP_SYS_ADMIN" in have):
            continue
        if name in ("CAP_BPF", "CAP_PERFMON"):
            cost, fatal = f"without it (and without CAP_SYS_ADMIN) the programs cannot be {'loaded' if name == 'CAP_BPF' else 'attached'}", True
        out.append({"capability": name, "cost": cost, "fatal": fatal})
    return out


def kprobes_available(tracefs_root: Path | None = None) -> bool:
    """CONFIG_KPROBES: the kprobe PMU or tracefs's kprobe_events exists."""
    if Path("/sys/bus/event_source/devices/kprobe").exists():
        return True
    return tracefs_root is not None and (Path(tracefs_root) / "kprobe_events").exists()


def resolve_symbols(functions: set[str], kallsyms: str = "/proc/kallsyms") -> dict[str, str]:
    """function -> the text symbol to attach a kprobe to: the name itself, or
    the name with a compiler suffix (`.isra.0`, `.constprop.0`; never `.cold`)."""
    found: dict[str, str] = {}
    try:
        f = open(kallsyms)
    except OSError:
        return found
    with f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in ("t", "T"):
                continue
            name = parts[2]
            base = name.split(".", 1)[0]
            if base not in functions or ".cold" in name:
                continue
            if name == base or base not in found:
                found[base] = name
    return found


def bcc_version() -> str | None:
    try:
        import bcc  # noqa: PLC0415

        return getattr(bcc, "__version__", "unknown")
    except ImportError:
        return None


# membarrier(2): its syscall number (asm/unistd.h) where the tracer runs
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
_MEMBARRIER_CMD_GLOBAL = 1  # waits for an RCU grace period (synchronize_rcu) on SMP kernels


def wait_rcu_grace_period() -> bool:
    """Block until an RCU grace period has passed (membarrier's global
    command). Attaching a program to a tracepoint that had none waits for a
    grace period since its last program left (tracepoint_add_func():
    tp_rcu_cond_sync: milliseconds, see docs/benchmarks.md); after this wait
    it is quick. False where the kernel or the machine offers no such wait."""
    import ctypes  # noqa: PLC0415 - only on this path

    nr = _SYS_MEMBARRIER.get(os.uname().machine)
    if nr is None:
        return False
    return ctypes.CDLL(None, use_errno=True).syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0
