"""Installing what the core needs into Slicer's Python: PyTorch through the PyTorch extension, then the rest.

Slicer's Python holds only what Slicer bundles (numpy, scipy, requests, pydicom, …) plus what
extensions install; everything else the core imports in Slicer is listed in
``Resources/requirements.txt`` (a test checks the imports against that file and Slicer 5.8's
bundle). The packages are installed by ``python -m pip`` run through ``PythonSlicer`` (as
``slicer.util.pip_install`` does on 5.8), with every package already installed pinned to its
version, so an install never upgrades or replaces what Slicer ships.

Nothing is installed without the user's consent: ``askConfirmation=True`` asks first. In Slicer's
testing mode its dialogs accept on their own, so the self-test never calls this in that mode (it
reports what is missing instead).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import tempfile
from collections import deque
from pathlib import Path

import slicer

from . import launcher
from .texts import _

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
# The oldest PyTorch the core runs with, and why: meshnet_lesion.devices.MIN_TORCH (not imported here: that
# module imports torch). A test keeps the two equal.
TORCH_REQUIREMENT = ">=2.6"
# Distribution name -> the module it installs, where they differ.
MODULE_NAMES = {"pynrrd": "nrrd"}


def requirements() -> list[str]:
    """The requirement lines of Resources/requirements.txt (comments and blank lines left out)."""
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def distributionName(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def missingPackages() -> list[str]:
    """Requirements from Resources/requirements.txt that cannot be imported (torch is separate)."""
    missing = []
    for requirement in requirements():
        name = distributionName(requirement)
        if importlib.util.find_spec(MODULE_NAMES.get(name.lower(), name.replace("-", "_"))) is None:
            missing.append(requirement)
    return missing


def torchTooOld() -> str | None:
    """The installed PyTorch's version when it is older than :data:`TORCH_REQUIREMENT`, else None (read from its
    metadata: torch is not imported)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:2]] + [0]
    wanted = [int(n) for n in re.findall(r"\d+", TORCH_REQUIREMENT)]
    return version if numbers[:2] < wanted[:2] else None


def dependenciesMissing() -> list[str]:
    """What a run still needs (PyTorch first); empty when everything imports."""
    old = torchTooOld()
    torch = ["torch"] if importlib.util.find_spec("torch") is None else [f"torch{TORCH_REQUIREMENT} (found {old})"] \
        if old else []
    return torch + missingPackages()


def pipInstall(packages: list[str], python: str | None = None) -> None:
    """``python -m pip install`` the packages with every installed distribution pinned to its version (as
    constraints), so nothing Slicer ships is upgraded or replaced. Raises RuntimeError with pip's last lines."""
    wanted = {distributionName(p).lower().replace("_", "-") for p in packages}
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") not in wanted})
    with tempfile.TemporaryDirectory(prefix="meshnet-lesion-pip-", dir=launcher.temporaryRoot()) as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        command = [python or launcher.pythonExecutable(), "-m", "pip", "install", "--disable-pip-version-check",
                   "--constraint", str(constraints), *packages]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   encoding="utf-8", errors="replace")
        last = deque(maxlen=12)
        for line in process.stdout:
            last.append(line.rstrip())
            _processEvents()   # the status line and the wait cursor stay alive while pip works
        if process.wait() != 0:
            raise RuntimeError(f"pip exited with code {process.returncode}:\n" + "\n".join(last))


def _processEvents() -> None:
    app = getattr(slicer, "app", None)
    if app is not None:
        app.processEvents()


def _installTorch(askConfirmation: bool) -> bool:
    """PyTorch (at least :data:`TORCH_REQUIREMENT`) through the PyTorch extension; False after telling why not."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay(_("MeshNet Lesion needs the PyTorch extension. Install 'PyTorch' from the "
                                   "Extensions Manager and restart Slicer."))
        return False
    try:
        installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                                 torchVersionRequirement=TORCH_REQUIREMENT)
    except Exception as error:  # noqa: BLE001 - pip's failures vary
        installed, reason = None, f" ({error})"
    else:
        reason = ""
    if installed is None:
        slicer.util.errorDisplay(_("PyTorch {requirement} was not installed{reason}; MeshNet Lesion cannot run "
                                   "without it.").format(requirement=TORCH_REQUIREMENT, reason=reason))
        return False
    return True


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install PyTorch (through the PyTorch extension; an older one than :data:`TORCH_REQUIREMENT` is updated) and
    the other packages, after asking. True when everything is importable; False, after telling the user why,
    otherwise."""
    if importlib.util.find_spec("torch") is None or torchTooOld():
        if not _installTorch(askConfirmation):
            return False
    missing = missingPackages()
    if missing:
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MeshNet Lesion needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing))):
            return False
        try:
            pipInstall(missing)
        except Exception as error:  # noqa: BLE001 - pip's failures vary (network, permissions, wheels)
            slicer.util.errorDisplay(
                _("Could not install {packages}: {error}\nCheck the network connection, or install them from "
                  "the Python console with slicer.util.pip_install().").format(packages=", ".join(missing),
                                                                            error=error))
            return False
        importlib.invalidate_caches()
    still = dependenciesMissing()
    if still:
        slicer.util.errorDisplay(_("Could not install: {packages}").format(packages=", ".join(still)))
        return False
    return True
