"""The package's layering (docs/architecture.md, "What each package may import"): the graph runtime
stands alone, no package imports one above it, and nothing under tessera/ imports a test reference or a
peer engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tessera"
# what each part of tessera may import from the rest of it
ALLOWED = {
    "model_config": set(),
    "graphs": set(),
    "distributed": {"graphs"},
    "layers": {"graphs", "model_config", "distributed"},
    "quant": {"graphs", "layers", "distributed"},
    "models": {"layers", "model_config", "distributed", "quant"},
    "loader": {"model_config", "models", "distributed", "quant"},
    "testing": {"graphs", "layers"},
    "engine": {"graphs", "layers", "loader", "models", "model_config", "distributed", "quant"},
    "server": {"engine", "loader"},
    "bench": {"server", "engine"},
    "cli": {"engine", "server", "bench", "loader"},
    "__main__": {"cli"},
    "__init__": {"engine"},
}
FORBIDDEN = {"transformers", "breakable_cuda_graphs", "vllm", "sglang"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _part(path: Path) -> str:
    """The package (or top-level module) a file belongs to: engine, graphs, cli, ..."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        me = _part(path)
        for name in _imports(path):
            if not name.startswith("tessera."):
                continue
            them = name.split(".")[1]
            if them != me and them not in ALLOWED[me]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, wrong


def test_no_module_imports_a_test_reference_or_a_peer_engine() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN
    ]
    assert not found, found


def test_the_graph_runtime_imports_nothing_else_of_tessera() -> None:
    code = (
        "import json, sys, tessera.graphs\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('tessera')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = json.loads(out)
    assert modules and all(m == "tessera" or m.startswith("tessera.graphs") for m in modules), modules
