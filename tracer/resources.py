"""Where the project's non-Python files are: the BPF sources and the compat header tree."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bpf_dir() -> Path:
    """The directory holding tcpcollide.h and the *.bpf.c programs.

    In a source checkout (and an editable install) that is the top-level
    `bpf/`; a wheel carries the same files as the `tracer/bpf` package data."""
    for candidate in (_HERE.parent / "bpf", _HERE / "bpf"):
        if (candidate / "tcpcollide.h").is_file():
            return candidate
    raise FileNotFoundError("the BPF sources (bpf/tcpcollide.h) are missing from this installation")


def compat_dir() -> Path:
    """The small header tree bcc compiles against instead of kernel headers."""
    return bpf_dir() / "compat"


def service_unit() -> Path:
    """The systemd unit (tracer/system/tcpcollide-trace.service)."""
    return _HERE / "system" / "tcpcollide-trace.service"
