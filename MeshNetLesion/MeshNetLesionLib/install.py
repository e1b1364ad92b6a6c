"""Installing what the core needs into Slicer's Python: PyTorch through the PyTorch extension, then the rest.

Nothing is installed without the user's consent (a self-test passes ``askConfirmation=False``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import slicer

from .texts import _

# Packages beyond PyTorch that the core needs in Slicer's Python (numpy ships with Slicer).
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def missingPackages() -> list[str]:
    """Requirements from Resources/requirements.txt that cannot be imported (torch is separate)."""
    names = []
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            module = requirement.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_")
            if importlib.util.find_spec(module) is None:
                names.append(requirement)
    return names


def _install(missing: list[str], askConfirmation: bool) -> bool:
    """Install ``missing``; False if the user declined. Raises what pip raises when it fails."""
    try:
        import slicer.packaging as packaging  # Slicer 5.12+
    except ImportError:
        packaging = None
    if packaging is not None and not slicer.app.testingEnabled():
        try:
            packaging.pip_ensure(missing, prompt_install=askConfirmation, requester="MeshNetLesion")
        except RuntimeError as error:
            if "declined" in str(error):
                return False
            raise
        return True
    # Slicer 5.8/5.10, or a self-test (pip_ensure skips installs while testing)
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MeshNet Lesion needs these Python packages: {packages}. Install them now?").format(
                packages=", ".join(missing))):
        return False
    slicer.util.pip_install(" ".join(missing))
    return True


def dependenciesMissing() -> list[str]:
    """What a run still needs (PyTorch first); empty when everything imports."""
    return (["torch"] if importlib.util.find_spec("torch") is None else []) + missingPackages()


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install PyTorch (through the PyTorch extension) and the other packages, after asking.

    Returns True when everything is importable; False (after telling the user why) otherwise.
    """
    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_("MeshNet Lesion needs the PyTorch extension. Install 'PyTorch' from the "
                                       "Extensions Manager and restart Slicer."))
            return False
        try:
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)
        except Exception as error:  # noqa: BLE001 - pip's failures vary
            installed, reason = None, f" ({error})"
        else:
            reason = ""
        if installed is None:
            slicer.util.errorDisplay(_("PyTorch was not installed{reason}; MeshNet Lesion cannot run without it.")
                                     .format(reason=reason))
            return False
    missing = missingPackages()
    if missing:
        try:
            if not _install(missing, askConfirmation):
                return False
        except Exception as error:  # noqa: BLE001 - pip's failures vary (network, permissions, wheels)
            slicer.util.errorDisplay(
                _("Could not install {packages}: {error}\nCheck the network connection, or install them from "
                  "the Python console with slicer.util.pip_install().").format(packages=", ".join(missing),
                                                                            error=error))
            return False
    still = missingPackages()
    if still:
        slicer.util.errorDisplay(_("Could not install: {packages}").format(packages=", ".join(still)))
        return False
    return True
