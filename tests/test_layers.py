"""The code's dependencies flow one way: domain <- log <- agent; the CLI on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "edge_agent"

# What each layer may import from the project besides itself.
ALLOWED = {
    "domain": {"errors", "cell"},
    "log": {"domain", "errors", "clock", "files"},
    "workflow": {"domain", "errors", "clock"},
    "devices": {"errors", "config", "cell"},
    "mqtt": {"domain", "errors", "config"},
    "config": {"errors"},
    "files": {"errors"},
    "clock": set(),
    "cell": set(),
    "storage": {"errors"},
    "demo": {"devices", "domain"},
    "errors": set(),
}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge_agent."):
            found.add(layer_of(node.module))
        elif isinstance(node, ast.Import):
            found.update(layer_of(a.name) for a in node.names if a.name.startswith("edge_agent."))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    files = [PACKAGE / f"{layer}.py"] if (PACKAGE / f"{layer}.py").exists() else sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    for path in files:
        outside = project_imports(path) - ALLOWED[layer] - {layer}
        assert not outside, f"{path.relative_to(PACKAGE)} imports {sorted(outside)}"


def test_the_pure_domain_does_no_io_and_reads_no_clock() -> None:
    forbidden = {"sqlite3", "asyncio", "time", "random", "os", "socket", "pathlib", "logging", "threading"}
    for path in sorted((PACKAGE / "domain").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not modules & forbidden, f"{path.name} imports {sorted(modules & forbidden)}"
        assert ".now(" not in path.read_text(encoding="utf-8"), f"{path.name} reads the clock"
