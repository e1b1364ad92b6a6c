"""Slicer's Python, not our venv: only what Slicer bundles, the PyTorch extension and what our installer adds.

Inside Slicer the code that runs (the module file, MeshNetLesionLib, the worker and the core modules
they reach) finds only:
- what Slicer 5.8 bundles, read from Slicer's sources at tag v5.8.1 (``SuperBuild/External_python-*.cmake``:
  the pinned requirement lines each file installs), below as :data:`SLICER_58_BUNDLE`;
- Slicer's own modules (``slicer``, ``vtk``, ``qt``, ``ctk``, the ``SampleData`` module);
- the PyTorch extension (``torch`` and its ``PyTorchUtils`` module);
- ``Resources/requirements.txt``, installed by :mod:`MeshNetLesionLib.install`.

The static test checks every import against that; the stock-environment test (``make test-slicer``,
marker ``slicer_env``) builds such a Python (a fresh venv holding Slicer 5.8's bundle and
``slicer-core``, a ``PythonSlicer`` launcher that behaves as CTK's AppLauncher, a PyTorch extension
stand-in that installs the local torch wheel), lets the module's own install logic install the
requirements, and runs the default model end to end through the launcher.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
import standin_pythonslicer as standin
from conftest import REPO
from slicer_code import MODULE_DIR, slicer_code, third_party_imports

# Slicer v5.8.1, SuperBuild/External_python-<file>.cmake -> the requirements each installs (import name: pin).
SLICER_58_BUNDLE: dict[str, dict[str, str]] = {
    "numpy": {"numpy": "numpy==1.26.4"},
    "scipy": {"scipy": "scipy==1.13.1"},
    "pythonqt-requirements": {"packaging": "packaging==24.0", "pyparsing": "pyparsing==3.1.2", "six": "six==1.16.0"},
    "requests-requirements": {"certifi": "certifi==2024.2.2", "idna": "idna==3.7",
                              "charset_normalizer": "charset-normalizer==3.3.2", "urllib3": "urllib3==2.2.1",
                              "requests": "requests==2.32.3"},
    "dicom-requirements": {"pydicom": "pydicom==2.4.4", "PIL": "pillow==10.3.0", "retrying": "retrying==1.3.4",
                           "dicomweb_client": "dicomweb-client==0.59.1"},
    "extension-manager-requirements": {"chardet": "chardet==5.2.0", "couchdb": "couchdb==1.2",
                                       "gitdb": "gitdb==4.0.11", "smmap": "smmap==5.0.1", "git": "GitPython==3.1.43"},
    "extension-manager-ssl-requirements": {
        "cryptography": "cryptography==42.0.7", "wrapt": "wrapt==1.16.0", "deprecated": "Deprecated==1.2.14",
        "pycparser": "pycparser==2.22", "cffi": "cffi==1.16.0", "nacl": "PyNaCl==1.5.0",
        "dateutil": "python-dateutil==2.9.0.post0", "typing_extensions": "typing_extensions==4.12.1",
        "github": "PyGithub==2.3.0"},
    "pip": {"pip": "pip==24.0"}, "setuptools": {"setuptools": "setuptools==70.0.0"}, "wheel": {"wheel": "wheel==0.43.0"},
}
BUNDLED = {module for group in SLICER_58_BUNDLE.values() for module in group}
SLICER_OWN = {"slicer", "vtk", "vtkmodules", "qt", "ctk", "SampleData"}
PYTORCH_EXTENSION = {"torch", "PyTorchUtils"}
TORCH_WHEEL = "torch==2.13.0"   # the local CPU wheel, standing in for what the PyTorch extension installs


def _requirement_modules() -> set[str]:
    from MeshNetLesionLib import install  # imports slicer: the slicer-core package

    return {install.MODULE_NAMES.get(install.distributionName(r).lower(), install.distributionName(r).replace("-", "_"))
            for r in install.requirements()}


def test_every_module_the_slicer_code_imports_is_bundled_by_slicer_58_the_pytorch_extension_or_installed_by_us():
    pytest.importorskip("slicer", reason="needs the slicer-core package")
    imported = third_party_imports(slicer_code())
    installed = _requirement_modules()
    unprovided = {module: sorted(files) for module, files in imported.items()
                  if module not in BUNDLED | SLICER_OWN | PYTORCH_EXTENSION | installed}
    assert not unprovided, f"imported inside Slicer, but neither bundled nor installed: {unprovided}"
    # and nothing is installed that Slicer already ships (an install must never replace Slicer's numpy or scipy)
    assert not installed & BUNDLED, installed & BUNDLED


def test_the_minimum_torch_is_one_number_everywhere():
    import tomllib

    from meshnet_lesion.devices import MIN_TORCH, check_torch_version

    pytest.importorskip("slicer", reason="needs the slicer-core package")
    from MeshNetLesionLib import install

    wanted = ".".join(map(str, MIN_TORCH))
    assert install.TORCH_REQUIREMENT == f">={wanted}"
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={wanted}" in dependencies
    check_torch_version(f"{wanted}.0")
    check_torch_version("2.13.0+cpu")
    with pytest.raises(Exception, match=f"older than {re.escape(wanted)}"):
        check_torch_version("2.5.1+cu121")


# ------------------------------------------------------------------------------- a stock Slicer Python
_DRIVER = textwrap.dedent('''
    """Runs inside the stock environment, as Slicer would: 'install' (first use), then, as after a restart of Slicer,
    'segment' through PythonSlicer."""
    import importlib.util, json, sys
    from pathlib import Path

    report = {}
    if sys.argv[1] == "install":
        report["missing_before"] = [m for m in ("torch", "nibabel", "safetensors", "pooch", "nrrd")
                                    if importlib.util.find_spec(m) is None]
        from MeshNetLesionLib import install
        report["missing_listed"] = install.dependenciesMissing()
        report["installed"] = install.ensureDependencies(askConfirmation=False)
        report["missing_after"] = install.dependenciesMissing()
        import numpy, scipy
        report["numpy"], report["scipy"] = numpy.__version__, scipy.__version__
    else:
        import numpy as np
        from headless_slicer import App
        from meshnet_lesion import load_volume
        from meshnet_lesion.registry import Registry
        from MeshNetLesionLib import launcher
        from MeshNetLesionLib.logic import MeshNetLesionLogic

        report["python_for_children"] = launcher.pythonExecutable()
        registry = Registry()
        scan = load_volume(registry.fetch("sample-arc-m2265-t2w")["M2265_T2w.nii.gz"])
        corner = np.array([48, 40, 62])          # a 160 x 128 x 128 mm part of the scan holding the lesion
        affine = scan.affine.copy()
        affine[:3, 3] = scan.affine[:3, :3] @ corner + scan.affine[:3, 3]
        app = App(Path(sys.argv[2]))
        node = app.add_volume("M2265 part", scan.array[48:208, 40:168, 62:190], affine)
        logic = MeshNetLesionLogic(app.scene, registry)
        report["launch_python"] = logic.launch().python
        job = logic.segmentAsync(node, device="cpu")          # the default model, brain mask on
        job.wait(timeout=1800)
        report["state"], report["error"] = job.state, str(job.error) if job.error else None
        report["torch_in_slicers_process"] = "torch" in sys.modules
        if job.state == "done":
            summary = logic.lesionSummary(job.segmentationNode)
            report["lesion_ml"], report["model"] = float(summary["LesionVolumeMl"]), summary["Model"]
    print("REPORT " + json.dumps(report))
''')

_PYTORCH_UTILS = textwrap.dedent('''
    """Stand-in for the PyTorch extension's PyTorchUtils module (fepegar/SlicerPyTorch): installTorch's signature,
    installing the local CPU wheel through PythonSlicer as the extension installs through it."""
    import json, os, subprocess, sys

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            with open(os.environ["PYTORCH_STANDIN_LOG"], "w") as log:
                json.dump({"torchVersionRequirement": torchVersionRequirement}, log)
            from MeshNetLesionLib import launcher
            requirement = "torch" + (torchVersionRequirement or "") + ",{wheel}"
            subprocess.run([launcher.pythonExecutable(), "-m", "pip", "install", "--quiet", requirement], check=True)
            import torch
            return torch
''').replace("{wheel}", TORCH_WHEEL.replace("torch", "", 1))


@pytest.fixture(scope="module")
def stock_python(tmp_path_factory) -> Path:
    """A fresh venv holding Slicer 5.8's bundle and slicer-core (with vtk, without vtk's optional matplotlib), and
    a PythonSlicer launcher beside its python, as Slicer's bin/ has them."""
    root = tmp_path_factory.mktemp("stock-slicer")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    pins = [pin for group in SLICER_58_BUNDLE.values() for pin in group.values()]
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins], check=True)
    slicer_core = [f"{name}=={importlib.metadata.version(name)}" for name in ("slicer-core", "vtk")]  # as tested here
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    *slicer_core], check=True)
    standin.install(python.parent, str(python))
    return python


@pytest.mark.slicer_env
def test_stock_slicer_python_installs_what_it_needs_and_segments_through_the_launcher(stock_python, tmp_path):
    import json

    stand_ins = tmp_path / "extensions"
    stand_ins.mkdir()
    (stand_ins / "PyTorchUtils.py").write_text(_PYTORCH_UTILS, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), str(stand_ins), str(REPO / "MeshNetLesion" / "Testing" /
                                                                              "Python")])
    env["PYTORCH_STANDIN_LOG"] = str(tmp_path / "pytorch-extension.json")
    (tmp_path / "share").mkdir()

    def run(*arguments: str) -> dict:
        done = subprocess.run([str(stock_python), "-c", _DRIVER, *arguments], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=3000)
        lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
        assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(lines[-1][len("REPORT "):])

    report = run("install")
    assert report["missing_before"] == ["torch", "nibabel", "safetensors", "pooch", "nrrd"], report
    assert report["missing_listed"][0] == "torch" and "nibabel>=5.0" in report["missing_listed"]
    assert report["installed"] is True and report["missing_after"] == [], report
    assert json.loads((tmp_path / "pytorch-extension.json").read_text())["torchVersionRequirement"] == ">=2.6"
    assert (report["numpy"], report["scipy"]) == ("1.26.4", "1.13.1"), "the install replaced Slicer's packages"
    report = run("segment", str(tmp_path / "share"))
    assert report["python_for_children"] == report["launch_python"] == str(stock_python.parent / "PythonSlicer")
    assert report["state"] == "done", report["error"]
    assert report["model"] == "arc-meshnet26" and report["lesion_ml"] > 20, report
    assert not report["torch_in_slicers_process"]
