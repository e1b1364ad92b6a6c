"""Seconds per training step (forward, backward, AdamW) of the paper's MeshNets on CPU crops.

Prints one row per (variant, crop edge): the median of a few steps after a warm-up step, and the
voxels per second, so crop sizes can be compared side by side in one run. 66³ stands beside 64³
because PyTorch's CPU convolution takes a slow path for MeshNet-5 at 64³ (README, Synthetic-trained models).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MeshNetLesion"))
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.train.model import build_meshnet  # noqa: E402
from meshnet_lesion.train.training import TrainConfig, make_loss, make_optimizer  # noqa: E402


def step_seconds(channels: int, edge: int, steps: int = 3) -> float:
    torch.manual_seed(0)
    model, config = build_meshnet(channels), TrainConfig(channels=channels)
    optimizer, loss_fn = make_optimizer(model, config), make_loss(config)
    x = torch.rand(1, 1, edge, edge, edge)
    y = (torch.rand(1, edge, edge, edge) > 0.98).long()
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    print(f"machine: {describe(machine())}")
    print(f"{'variant':10} {'crop':>5} {'s/step':>8} {'Mvoxel/s':>9}")
    for channels in (5, 16, 26):
        for edge in (64, 66, 96):
            seconds = step_seconds(channels, edge)
            print(f"MeshNet-{channels:<2} {edge:>4}³ {seconds:8.2f} {edge ** 3 / seconds / 1e6:9.3f}", flush=True)


if __name__ == "__main__":
    main()
