"""The code that runs inside Slicer, found by following imports from the module file and MeshNetLesionLib.

Used by the tests that check what CMake ships to Slicer and what that code imports.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

MODULE_DIR = REPO / "MeshNetLesion"


def _module_file(name: str) -> Path | None:
    for candidate in (MODULE_DIR / f"{name.replace('.', '/')}.py", MODULE_DIR / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, package: str) -> set[str]:
    """Every module a file imports (at any depth: function-level imports count), plus the package's lazy names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            names |= {f"{package}.{value.value}" for value in node.value.values}  # __init__'s lazy attributes
    return names


def slicer_code() -> set[str]:
    """The files the panel can reach from MeshNetLesion.py and MeshNetLesionLib, following imports."""
    todo = ["MeshNetLesion"] + [f"MeshNetLesionLib.{p.stem}" for p in (MODULE_DIR / "MeshNetLesionLib").glob("*.py")]
    seen: set[Path] = set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imported_names(path, package):
            parts = imported.split(".")
            todo += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return {p.relative_to(MODULE_DIR).as_posix() for p in seen}


def third_party_imports(files: set[str]) -> dict[str, set[str]]:
    """Top-level modules outside the standard library and this repository imported anywhere in ``files`` (paths
    relative to MeshNetLesion/; function-level imports count), each with the files that import it."""
    ours = {"meshnet_lesion", "MeshNetLesionLib", "MeshNetLesion"}
    found: dict[str, set[str]] = {}
    for relative in files:
        tree = ast.parse((MODULE_DIR / relative).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    found.setdefault(top, set()).add(relative)
    return found
