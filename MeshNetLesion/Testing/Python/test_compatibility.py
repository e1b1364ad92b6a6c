"""What runs inside Slicer must stay valid on its Pythons: 3.9 (Slicer 5.8) through 3.12 (Slicer 5.10, 5.12)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MODULE_DIR = REPO / "MeshNetLesion"
INSIDE_SLICER = [MODULE_DIR / "MeshNetLesion.py", MODULE_DIR / "MeshNetLesionLib", MODULE_DIR / "meshnet_lesion"]


def _sources() -> list[Path]:
    return [p for root in INSIDE_SLICER for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]


def test_vermin_finds_nothing_newer_than_python_3_9():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent))
    assert vermin, "vermin is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([vermin, "--target=3.9-", "--violations", "--no-tips", "--eval-annotations",
                           *map(str, INSIDE_SLICER)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", ["3.9", "3.12"])
def test_every_file_compiles_under_slicers_pythons(version, tmp_path):
    # pyenv's own builds first: its shims answer only for the versions a folder has activated
    candidates = sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    candidates += [c for c in [shutil.which(f"python{version}")] if c and ".pyenv/shims" not in c]
    interpreter = next(iter(candidates), None)
    if interpreter is None:
        pytest.skip(f"no Python {version} on this machine (pyenv install {version})")
    code = ("import sys, py_compile\n"
            "for path in sys.argv[1:]:\n"
            "    py_compile.compile(path, cfile=path + '.pyc-check', doraise=True)\n")
    copies = []
    for source in _sources():
        copy = tmp_path / source.relative_to(MODULE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, copy)
        copies.append(str(copy))
    done = subprocess.run([interpreter, "-c", code, *copies], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
