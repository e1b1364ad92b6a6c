"""Per-call time of the thin-slab convolutions that PyTorch sends to its slow reference kernels
(N·C·D·H ≤ 20480) against oneDNN called directly, as the engine now does. Prints one row per shape.

    .venv/bin/python lab/benchmarks/slow_kernel.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = ((8, 8, 10, 4), (8, 8, 8, 2), (8, 8, 10, 2), (1, 8, 16, 1), (1, 8, 10, 1), (8, 8, 40, 16))


def best_ms(run, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"{'in ch':>6}{'out ch':>7}{'rows':>5}{'dilation':>9}{'F.conv3d':>11}{'oneDNN':>9}{'ratio':>7}  kernel F.conv3d picks")
    for c_in, c_out, rows, dilation in SHAPES:
        x = torch.randn(1, c_in, rows, 256, 256).contiguous(memory_format=torch.channels_last_3d)
        w, b = torch.randn(c_out, c_in, 3, 3, 3), torch.randn(c_out)
        padding = [0, dilation, dilation]
        plain = best_ms(lambda: F.conv3d(x, w, b, padding=padding, dilation=dilation))
        direct = best_ms(lambda: torch.ops.aten.mkldnn_convolution(x, w, b, padding, [1, 1, 1], [dilation] * 3, 1))
        slow = c_in * rows * 256 <= 20480
        print(f"{c_in:>6}{c_out:>7}{rows:>5}{dilation:>9}{plain:>9.1f}ms{direct:>7.1f}ms{plain / direct:>6.1f}×  "
              f"{'slow reference' if slow else 'oneDNN'}")


if __name__ == "__main__":
    main()
