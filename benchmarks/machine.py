"""The machine a figure was measured on: CPU model and the flags that decide kernel speed, cores, PyTorch build."""
from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "cpu": platform.processor(),
            "cpu_flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
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
