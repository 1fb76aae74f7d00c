"""The package's layers, checked on the source: imports point one way and never in a circle.

core (``st3_hf.sparse``: torch only) <- ``st3_hf.hub`` (files and models) <- ``st3_hf.train`` <- scripts.
``st3_hf.inference`` (sparse CPU kernels) sits on the core alone: torch and ``st3_hf.sparse``, never hub or train;
the hub may use it (a compact file loaded straight into the kernels), as may train.
``st3_hf.errors`` (and the other leaf modules directly in ``st3_hf/``) sit below all of them.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / "st3_hf"
LEAVES = {"st3_hf.errors", "st3_hf.atomic", "st3_hf.file_checks"}
THIRD_PARTY_OF_CORE = {"torch"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports in functions count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from st3_hf.sparse import layers` imports the module st3_hf.sparse.layers
            found.update(f"{module}.{a.name}" for a in node.names if (PACKAGE.parent / f"{module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
    if module in LEAVES or module == "st3_hf":
        return "leaf" if module in LEAVES else "root"
    return module.split(".")[1]


def test_core_imports_torch_and_the_core_only() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in [*(PACKAGE / "sparse").rglob("*.py"), *(PACKAGE / "inference").rglob("*.py")]:
        own = _module_name(path).split(".")[1]  # sparse, or inference (which may also import sparse)
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top == "st3_hf":
                assert imported.startswith(("st3_hf.sparse", f"st3_hf.{own}")) or imported in LEAVES, f"{_module_name(path)} imports {imported}"
            else:
                assert top in stdlib or top in THIRD_PARTY_OF_CORE, f"{_module_name(path)} imports {imported}"


def test_arrows_point_down_only() -> None:
    allowed = {"leaf": {"leaf"}, "sparse": {"sparse", "leaf"}, "hub": {"hub", "sparse", "inference", "leaf"},
               "train": {"train", "hub", "sparse", "inference", "leaf"},
               "inference": {"inference", "sparse", "leaf"}}
    for module, imported in _graph().items():
        layer = _layer(module)
        if layer == "root":
            continue  # st3_hf/__init__.py: the public names, taken from the layers
        for target in imported:
            if _layer(target) == "root":
                continue  # `from st3_hf import __version__`
            assert _layer(target) in allowed[layer], f"{module} ({layer}) imports {target} ({_layer(target)})"


def test_no_import_cycles() -> None:
    graph = _graph()
    graph.pop("st3_hf", None)  # the package root re-exports; submodules importing the root for __version__ is no cycle
    for deps in graph.values():
        deps.discard("st3_hf")
    state: Dict[str, int] = {}

    def visit(node: str, trail: list) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how packages expose names, not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
