"""What the running kernel offers the tracer, found by looking, never assumed.

Pure reads of /proc and /sys (plus tracefs, which it can mount); no BPF here.
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


def version_tuple(rel: str | None = None) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", rel or release())
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


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
    """A kernel header tree for the running kernel, if installed."""
    build = Path(f"/lib/modules/{release()}/build")
    return build if (build / "include" / "linux").is_dir() else None


def lockdown() -> str:
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def netns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def require_root() -> None:
    if os.geteuid() != 0:
        raise KernelError("tcpcollide-trace must run as root (it loads BPF programs)")
