"""The layout the code promises: a Slicer-free core named as it is installed, Slicer-side code beside it."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile

from conftest import REPO

MODULE_DIR = REPO / "MeshNetLesion"
CORE = MODULE_DIR / "meshnet_lesion"
SLICER_SIDE = MODULE_DIR / "MeshNetLesionLib"


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_core_module_imports_with_slicer_vtk_and_qt_absent():
    """As in a plain venv: importing any core module never reaches for a Slicer package."""
    modules = sorted(".".join(p.relative_to(MODULE_DIR).with_suffix("").parts).replace(".__init__", "")
                     for p in CORE.rglob("*.py"))
    code = ("import sys, importlib\n"
            "for blocked in ('slicer', 'vtk', 'qt', 'ctk', 'MeshNetLesionLib'):\n"
            "    sys.modules[blocked] = None\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MODULE_DIR)
    assert done.returncode == 0, done.stderr


def test_the_core_never_imports_the_slicer_side_and_the_slicer_side_uses_the_core():
    for path in CORE.rglob("*.py"):
        imported = _imported_modules(path)
        assert not {m for m in imported if m.split(".")[0] in ("slicer", "vtk", "qt", "ctk", "MeshNetLesionLib")}, path
    uses = set().union(*(_imported_modules(p) for p in SLICER_SIDE.glob("*.py")))
    assert any(m.startswith("meshnet_lesion") for m in uses)


def test_the_wheel_holds_only_the_core_and_its_registry(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("meshnet_lesion-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"meshnet_lesion"}
    assert "meshnet_lesion/models.json" in names and "meshnet_lesion/formats/tfjs.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "meshnet-lesion = meshnet_lesion.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
