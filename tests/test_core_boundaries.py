"""The core package stands on its own: it imports with Prefect made unimportable, and its modules
form no import cycle (a module that imports another only inside a function still counts)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "loraflow"

NO_PREFECT = """
import importlib, pkgutil, sys
import importlib.abc

class NoPrefect(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "prefect" or name.startswith(("prefect.", "prefect_")):
            raise ImportError(f"the core imported {name}")

sys.meta_path.insert(0, NoPrefect())
import loraflow
for module in pkgutil.walk_packages(loraflow.__path__, "loraflow."):
    importlib.import_module(module.name)
print("imported", len(list(pkgutil.walk_packages(loraflow.__path__, "loraflow."))))
"""


def test_every_core_module_imports_without_prefect():
    done = subprocess.run([sys.executable, "-c", NO_PREFECT], capture_output=True, text=True, timeout=300,
                          cwd=CORE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("imported ")


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """Core modules `path` imports at run time: everywhere but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraflow"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("loraflow")}
    return (found & modules) - {_module_name(path), "loraflow"}


def test_the_core_has_no_import_cycle():
    paths = {_module_name(path): path for path in CORE.rglob("*.py")}
    graph = {name: _runtime_imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for needed in sorted(graph[name]):
            assert state.get(needed) != "open", "import cycle: " + " -> ".join([*trail, name, needed])
            if needed not in state:
                visit(needed, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
