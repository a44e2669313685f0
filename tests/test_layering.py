"""The package's imports follow its data flow: no cycles, and no library module reaching up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "sparsebench"

# Module prefixes each part may never import (at module level or inside a function).
FORBIDDEN = {
    "sparsebench.sparse": (
        "sparsebench.bench",
        "sparsebench.quant",
        "sparsebench.prune",
        "sparsebench.train",
        "sparsebench.multirun",
        "sparsebench.experiment",
        "sparsebench.report",
        "sparsebench.track",
    ),
    "sparsebench.prune": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment", "sparsebench.report"),
    "sparsebench.quant": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment", "sparsebench.report"),
    "sparsebench.train": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment"),
    "sparsebench.data": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment"),
    "sparsebench.loaders": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment"),
    # The Python API stands beside the Hydra app, on the library: none of the app's own wing.
    "sparsebench.api": (
        "sparsebench.multirun",
        "sparsebench.experiment",
        "sparsebench.report",
        "sparsebench.hydra_app",
    ),
    "sparsebench.models": ("sparsebench.bench", "sparsebench.multirun", "sparsebench.experiment"),
    "sparsebench.bench": ("sparsebench.multirun", "sparsebench.experiment", "sparsebench.report"),
    "sparsebench.report": ("sparsebench.multirun", "sparsebench.experiment"),
    "sparsebench.rundir": ("sparsebench.multirun", "sparsebench.experiment", "sparsebench.report", "sparsebench.bench"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Tuple[Set[str], Set[str]]:
    """(module-level imports, all imports) of sparsebench modules in ``path``."""
    tree = ast.parse(path.read_text())
    top: Set[str] = set()
    every: Set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in names if n.startswith("sparsebench")]
        every.update(names)
        if node in tree.body or any(node in getattr(b, "body", []) for b in tree.body if isinstance(b, ast.If)):
            top.update(names)
    return top, every


def graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    top, every = {}, {}
    for name, path in modules.items():
        t, e = imports(path)
        top[name] = {m for m in t if m in modules}  # "from pkg import name" counts as pkg (and pkg.name if a module)
        every[name] = {m for m in e if m in modules}
    return top, every


def test_no_import_cycles_at_module_level():
    top, _ = graph()
    state: Dict[str, int] = {}

    def visit(node: str, path: list) -> None:
        state[node] = 1
        for nxt in sorted(top.get(node, ())):
            if nxt == node or nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(top):
        if module not in state:
            visit(module, [module])


def test_library_modules_never_import_the_layers_above_them():
    _, every = graph()
    bad = [
        f"{m} imports {i}"
        for m, deps in every.items()
        for part, banned in FORBIDDEN.items()
        if m == part or m.startswith(part + ".")
        for i in deps
        if i.startswith(banned)
    ]
    assert not bad, bad


def test_the_command_lines_start_without_torch():
    """--version, --help and the config checks run before any torch import (seconds of every start); the
    packages whose config modules they read import their torch side on first use (sparsebench.lazy)."""
    apps = "sparsebench.__main__, sparsebench.bench.grid, sparsebench.config, sparsebench.hydra_app"
    probe = f"import sys, {apps}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    from sparsebench.prune import build_pruner
    from sparsebench.quant import export_model

    assert build_pruner.__module__ == "sparsebench.prune.pruner"
    assert export_model.__module__ == "sparsebench.quant.export"
