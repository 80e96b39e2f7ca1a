"""Older versions of the tracer from git, for the benchmarks that compare
side by side (scripts/bench-startup, scripts/bench-churn): each is checked
out once into a git worktree under /tmp and run with this checkout's
virtualenv (the same bcc, Python and libraries), its package first on
PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_040 = "fe4b5c7"  # 0.4.0 as it landed


def worktree(ref: str) -> Path:
    """A checkout of `ref` (made once, kept for the next run)."""
    path = Path(f"/tmp/tcpcollide-peer-{ref}")
    if not (path / "tracer").exists():
        # a worktree whose directory went (a wiped /tmp) is still registered until pruned
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)
    return path


def env_for(tree: Path) -> dict[str, str]:
    """The environment that runs the tracer of `tree` with this virtualenv."""
    return {**os.environ, "PYTHONPATH": str(tree)}
