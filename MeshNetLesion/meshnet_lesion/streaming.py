"""What the engine streams with: a layer's rows as a sliding window along the first axis, per-channel arithmetic
on whole rows, per-channel statistics of a slab (GroupNorm's first pass), activations in place, and the run's
progress counted in multiply-accumulates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .progress import Progress

# In-place GELU: not in torch.nn.functional, but an ATen operator (absent from some older builds).
_GELU_ = getattr(torch.ops.aten, "gelu_", None)


class Window:
    """Rows of one layer's output, with ``pad`` zero rows before row 0 and after the last row.

    New rows are written in place at the end of the buffer (:meth:`reserve` / :meth:`commit`);
    when the buffer is full, the rows still needed move to its front (one copy per ``slack``
    rows written). A read is always a view.
    """

    def __init__(self, channels: int, pad: int, needed: int, shape: tuple[int, int, int], like: torch.Tensor) -> None:
        self.depth, self.pad = shape[0], pad
        self.capacity = needed + max(needed // 2, 1)
        self.buffer = torch.empty((1, channels, self.capacity, *shape[1:]), device=like.device, dtype=like.dtype,
                                  memory_format=torch.channels_last_3d)
        self.first, self.offset, self.count = -pad, 0, pad
        self.buffer[:, :, :pad] = 0

    @classmethod
    def holding(cls, tensor: torch.Tensor, pad: int) -> Window:
        """A window over a whole tensor (copied once, with its zero rows)."""
        window = cls.__new__(cls)
        window.depth, window.pad = tensor.shape[2], pad
        window.buffer = F.pad(tensor, (0, 0, 0, 0, pad, pad)).contiguous(memory_format=torch.channels_last_3d) \
            if pad else tensor
        window.capacity = window.count = window.depth + 2 * pad
        window.first, window.offset = -pad, 0
        return window

    def reserve(self, n: int) -> torch.Tensor:
        """The buffer view that the next ``n`` rows are written into."""
        if self.count + n + self.pad > self.capacity:
            raise RuntimeError("streaming window overflow")  # a bug, not a user error
        if self.offset + self.count + n + self.pad > self.capacity:
            # Move the kept rows to the front in pieces no longer than the gap, so that no piece
            # overlaps its source (one copy, no temporary).
            gap = self.offset
            for lo in range(0, self.count, gap):
                hi = min(lo + gap, self.count)
                self.buffer[:, :, lo:hi] = self.buffer[:, :, self.offset + lo:self.offset + hi]
            self.offset = 0
        return self.buffer[:, :, self.offset + self.count:self.offset + self.count + n]

    def commit(self, n: int, finished: bool) -> None:
        self.count += n
        if finished and self.pad:  # the zero rows after the last row
            self.buffer[:, :, self.offset + self.count:self.offset + self.count + self.pad] = 0
            self.count += self.pad

    def discard_below(self, row: int) -> None:
        drop = min(max(0, row - self.first), self.count)
        self.first += drop
        self.offset += drop
        self.count -= drop

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        if lo < self.first or hi > self.first + self.count:
            raise RuntimeError("streaming window lacks rows it was asked for")  # a bug, not a user error
        return self.buffer[:, :, self.offset + lo - self.first:self.offset + hi - self.first]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, C, D, H, W) tensor as a (D·H, W·C) view, for per-channel arithmetic.

    Broadcasting a (C,) vector over the last axis runs vectorised only when that axis is long: on
    16 or 26 channels in bf16, PyTorch's CPU kernels are about 5x slower than on whole rows (W·C).
    """
    return t.permute(0, 2, 3, 4, 1).view(-1, t.shape[-1] * t.shape[1])


def along_rows(per_channel: torch.Tensor, width: int) -> torch.Tensor:
    """A per-channel vector repeated for each voxel of a row, to go with :func:`as_rows`."""
    return per_channel.reshape(-1).repeat(width)


def add_statistics(y: torch.Tensor, sums: torch.Tensor, squares: torch.Tensor, chunk: int = 2 ** 16) -> None:
    """Add each channel's sum and sum of squares over a channels-last slab (float64 accumulators).

    Channels-last memory is a (voxels, channels) matrix: two small matrix products give the sums
    far faster than a strided reduction. Lower precisions are widened to float32 a cache-sized
    chunk of voxels at a time, not as a whole copy of the slab.
    """
    matrix = y.permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1])
    step = matrix.shape[0] if matrix.dtype == torch.float32 else chunk
    ones = torch.ones(1, min(step, matrix.shape[0]), device=y.device)
    for lo in range(0, matrix.shape[0], step):
        part = matrix[lo:lo + step].float()
        sums += (ones[:, :part.shape[0]] @ part)[0].double()
        squares += torch.diagonal(part.T @ part).double()


def activate_(t: torch.Tensor, activation: str) -> None:
    if activation == "relu":
        F.relu_(t)
    elif activation == "elu":
        F.elu_(t)
    elif activation == "gelu":
        if _GELU_ is not None:
            _GELU_(t)    # 4x faster than gelu + copy back on a 16-channel slab, bit for bit the same
        else:
            t.copy_(F.gelu(t))


class Tracker:
    """Progress as the share of multiply-accumulates done (per layer and rows), and cancellation."""

    def __init__(self, progress: Progress, macs: list[int], depth: int) -> None:
        self.progress, self.macs = progress, macs
        self.total = float(sum(macs) * depth)
        self.done_macs = 0.0
        self.check = progress.check

    def advance(self, layer: int, rows: float) -> None:
        self.done_macs += self.macs[layer] * rows
        self.progress.report(self.done_macs / self.total, f"layer {layer + 1} of {len(self.macs)}")

    def done(self) -> None:
        self.progress.report(1.0, "network done")
