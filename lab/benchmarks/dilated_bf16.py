"""bf16 against fp32 for one MeshNet-26 hidden layer (26 → 26 channels, 3³ kernel) at each of MeshNet's
dilations, on a slab of 64 rows of 256 × 256 (channels-last, oneDNN called directly as the engine does), with
the oneDNN kernel each one runs. Why ``auto`` precision measures instead of assuming: on a CPU with AMX,
bf16 is about twice as fast as fp32 at dilation 1 and 2 and many times slower at 8 and 16, so for MeshNet
as a whole it loses; on AVX-512 BF16 without AMX (AMD EPYC) the whole network ran twice as fast in bf16.

    .venv/bin/python lab/benchmarks/dilated_bf16.py          # writes lab/benchmarks/results/dilated_bf16.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "benchmarks")]

from slow_kernel import best_ms  # noqa: E402

from meshnet_lesion.machine import describe, machine  # noqa: E402

RESULTS = ROOT / "lab" / "benchmarks" / "results" / "dilated_bf16.json"
DILATIONS = (1, 2, 4, 8, 16)
CHANNELS, ROWS = 26, 64


def kernels() -> dict[str, str]:
    """The oneDNN implementation of each (precision, dilation), from a child run with ONEDNN_VERBOSE=1."""
    code = ("import torch\n"
            f"x = torch.randn(1, {CHANNELS}, 8, 256, 256).contiguous(memory_format=torch.channels_last_3d)\n"
            f"w = torch.randn({CHANNELS}, {CHANNELS}, 3, 3, 3)\n"
            "for dtype in (torch.float32, torch.bfloat16):\n"
            f"    for d in {DILATIONS}:\n"
            "        torch.ops.aten.mkldnn_convolution(x.to(dtype), w.to(dtype), None, [d] * 3, [1] * 3, [d] * 3, 1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}, check=True).stdout
    found = [line.split(",")[6] for line in out.splitlines() if ",exec,cpu,convolution," in line]
    names = [f"{p}-{d}" for p in ("fp32", "bf16") for d in DILATIONS]
    return dict(zip(names, found))


def main() -> int:
    torch.manual_seed(0)
    info = machine()
    print(f"machine: {describe(info)}")
    x = torch.randn(1, CHANNELS, ROWS, 256, 256).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(CHANNELS, CHANNELS, 3, 3, 3), torch.randn(CHANNELS)
    used = kernels()
    rows = []
    print(f"{'dilation':>8}{'fp32':>9}{'bf16':>9}{'bf16/fp32':>11}  kernels (fp32 / bf16)")
    for d in DILATIONS:
        seconds = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            seconds[name] = best_ms(lambda: torch.ops.aten.mkldnn_convolution(xd, wd, bd, [d] * 3, [1] * 3, [d] * 3, 1),
                                    repeats=3) / 1e3
        ratio = seconds["bf16"] / seconds["fp32"]
        rows.append({"dilation": d, "fp32_s": round(seconds["fp32"], 3), "bf16_s": round(seconds["bf16"], 3),
                     "ratio": round(ratio, 2), "kernels": [used.get(f"fp32-{d}"), used.get(f"bf16-{d}")]})
        print(f"{d:>8}{seconds['fp32']:>8.2f}s{seconds['bf16']:>8.2f}s{ratio:>10.2f}×  "
              f"{used.get(f'fp32-{d}')} / {used.get(f'bf16-{d}')}", flush=True)
    RESULTS.write_text(json.dumps({"machine": info, "date": time.strftime("%Y-%m-%d"),
                                   "command": "python lab/benchmarks/dilated_bf16.py",
                                   "shape": [1, CHANNELS, ROWS, 256, 256], "rows": rows}, indent=1) + "\n",
                       encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
