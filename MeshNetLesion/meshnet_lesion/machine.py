"""The machine a figure or a training run was measured on: CPU model and the flags that decide kernel speed,
cores, PyTorch build (benchmarks print it with every figure; a distillation run records it per session)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next(line.split(":", 1)[1].split() for line in handle if line.startswith("flags"))
        info["cpu_flags"] = [flag for flag in FLAGS if flag in flags]
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(info: dict) -> str:
    """One line: 'AMD EPYC (avx2 fma avx512f …), 2 CPUs, PyTorch 2.13.0+cpu, Python 3.11.7'."""
    flags = " ".join(info.get("cpu_flags", [])) or "no listed flags"
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']} ({flags}), {info['cpus']} CPUs, {info['threads']} torch threads, "
            f"PyTorch {info['torch']}, Python {info['python']}{gpu}")
