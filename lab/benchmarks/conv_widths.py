"""Time one dilated 3×3×3 convolution (channels-last, fp32) at each channel width.

    .venv/bin/python lab/benchmarks/conv_widths.py [--rows 4 16] [--max 32]

The basis of ``engine.padded_width``: how fast each hidden width runs on this CPU, so widths
that run faster when zero-padded can be spotted. Prints ms and GFLOP/s per width (best of 3).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_of(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16], help="output rows per call (slab depth)")
    parser.add_argument("--max", type=int, default=32, help="largest width")
    parser.add_argument("--plane", type=int, default=256, help="in-plane size")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'rows':>4} {'width':>5} {'ms':>8} {'GFLOP/s':>8}")
    with torch.inference_mode():
        for rows in args.rows:
            for width in range(4, args.max + 1):
                x = torch.randn(1, width, rows + 8, args.plane, args.plane).contiguous(
                    memory_format=torch.channels_last_3d)
                w = torch.randn(width, width, 3, 3, 3) * 0.1
                seconds = best_of(lambda: F.conv3d(x, w, None, padding=(0, 4, 4), dilation=4))
                flops = 2 * width * width * 27 * rows * args.plane ** 2
                print(f"{rows:>4} {width:>5} {seconds * 1000:>8.1f} {flops / seconds / 1e9:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
