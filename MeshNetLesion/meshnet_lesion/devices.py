"""Which device and precision a run uses: ``auto`` and explicit choices, and why a device is missing."""
from __future__ import annotations

import torch

from .errors import DeviceError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        reasons["mps"] = None
    else:
        reasons["mps"] = "Apple Metal (MPS) is not available on this machine"
    return reasons


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is missing is an error."""
    name = (name or "auto").lower()
    reasons = available_devices()
    if name == "auto":
        for kind in ("cuda", "mps"):
            if reasons[kind] is None:
                return torch.device(kind)
        return torch.device("cpu")
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
