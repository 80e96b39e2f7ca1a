"""The package's layering, checked from the source (no import at all): the
pipeline (events, ordering, correlator, records, recording, replay) is pure,
so that it can be tested without root and replayed without BPF. It imports
neither the kernel layer (tracer/kernel) nor the host layer (tracer/host),
nor bcc, nor the output and CLI layers that sit above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tracer"
FORBIDDEN = {
    "pipeline": ("tracer.kernel", "tracer.host", "tracer.output", "tracer.cli", "tracer.session", "bcc"),
    "kernel": ("tracer.host", "tracer.output", "tracer.cli", "tracer.session"),
    "host": ("tracer.kernel", "tracer.output", "tracer.cli", "tracer.session", "bcc"),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_rule_sees_imports():
    # a checker that finds nothing would pass anything
    assert "tracer.pipeline.correlator" in imports(PACKAGE / "pipeline" / "flow.py")
    assert "tracer.kernel" in imports(PACKAGE / "session.py")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_is_below_it(layer):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, layer
    bad = [f"{f.relative_to(PACKAGE.parent)} imports {m}" for f in files for m in sorted(imports(f))
           if any(m == x or m.startswith(x + ".") for x in FORBIDDEN[layer])]
    assert bad == []
