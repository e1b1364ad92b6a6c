"""Which device and precision a run uses: ``auto`` and explicit choices, and why a device is missing.

The oldest PyTorch the core runs with is :data:`MIN_TORCH`: 2.6 is the first release whose
``torch.load(weights_only=True)`` is not open to code execution from a crafted file (CVE-2025-32434,
fixed in 2.6.0), and the replication's checkpoints are loaded that way; ``torch.OutOfMemoryError``
(2.5) is used too. Slicer 5.8 runs Python 3.9, for which the newest PyTorch is 2.8; 5.10 and 5.12 run
3.12. Downloaded weights are checked against their SHA-256 before any loader sees them; a PyTorch
checkpoint a user imports is trusted to that unpickler, which PyTorch hardened again in 2.10
(CVE-2026-24747).

Apple's MPS is used only when asked for and only if a small dilated 3D convolution runs there and
matches the CPU: some 3D convolutions are missing on MPS (TotalSegmentator turns it off for that
reason), and this code has never run on a Mac. ``auto`` is CUDA, else the CPU.
"""
from __future__ import annotations

import re

import torch

from .errors import DeviceError

MIN_TORCH = (2, 6)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_version(text: str | None = None) -> tuple[int, int]:
    """(major, minor) of a PyTorch version string ("2.13.0+cpu" -> (2, 13)); this torch's by default."""
    numbers = re.findall(r"\d+", (text or torch.__version__).split("+")[0])[:2]
    return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0


def check_torch_version(text: str | None = None) -> None:
    """Refuse a PyTorch older than :data:`MIN_TORCH` with one sentence saying what to do."""
    if torch_version(text) < MIN_TORCH:
        raise DeviceError(f"PyTorch {text or torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the "
                          "oldest MeshNet Lesion runs with (older ones can run code hidden in a weight file); "
                          "update it (in Slicer: the PyTorch extension's module, or reinstall through MeshNet Lesion)")


def _mps_runs_meshnet() -> str | None:
    """None if a dilated 3D convolution on MPS matches the CPU's, else why not."""
    try:
        x = torch.arange(2 * 9 ** 3, dtype=torch.float32).reshape(1, 2, 9, 9, 9) / 1000
        weight = torch.linspace(-1, 1, 3 * 2 * 27).reshape(3, 2, 3, 3, 3)
        expected = torch.nn.functional.conv3d(x, weight, padding=2, dilation=2)
        found = torch.nn.functional.conv3d(x.to("mps"), weight.to("mps"), padding=2, dilation=2).cpu()
    except Exception as error:  # noqa: BLE001 - whatever MPS raises, the device is not usable
        return f"Apple Metal (MPS) cannot run MeshNet's dilated 3D convolutions here ({error})"
    if not torch.allclose(found, expected, rtol=1e-3, atol=1e-3):
        return "Apple Metal (MPS) gives wrong results for MeshNet's dilated 3D convolutions here"
    return None


def available_devices() -> dict[str, str | None]:
    """Each device kind mapped to None if usable here, else the reason it is not."""
    reasons: dict[str, str | None] = {"cpu": None}
    if torch.cuda.is_available():
        reasons["cuda"] = None
    elif torch.version.cuda is None:
        reasons["cuda"] = f"this PyTorch ({torch.__version__}) is built without CUDA"
    else:
        reasons["cuda"] = "no CUDA GPU is visible to PyTorch"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        reasons["mps"] = _mps_runs_meshnet()
    else:
        reasons["mps"] = "Apple Metal (MPS) is not available on this machine"
    return reasons


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, else the CPU (never MPS: see the module's text); an explicit device that is missing
    or cannot run MeshNet is an error. A ``torch.device`` was resolved already and is returned as it is."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reasons = available_devices()
    kind = name.split(":")[0]
    if kind not in reasons:
        raise DeviceError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if reasons[kind] is not None:
        raise DeviceError(f"device '{name}' was requested but {reasons[kind]}")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' was requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 convolutions run natively; elsewhere they are emulated and slow."""
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in check if f is not None)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, list[str]]:
    """The precision to run and any warning. ``auto``: fp16 on CUDA, fp32 elsewhere (the engine's own rule;
    the pipeline's ``auto`` may measure bf16 faster on a CPU that has it: see :mod:`.calibration`)."""
    if precision == "auto":
        return ("fp16" if device.type == "cuda" else "fp32"), []
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision '{precision}' (use auto, fp32, fp16 or bf16)")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("fp16 is not supported on the CPU; use fp32 or bf16")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "fp32", ["this CPU has no native bf16 (AVX-512 BF16 or AMX); fp32 was used"]
    return precision, []
