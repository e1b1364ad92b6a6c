"""Tiled inference: a network run on overlapping cubes of its input instead of the whole box at once.

For models trained on crops smaller than their receptive field (the distilled students: 93 voxels, crops
of 64³ or 96³): on the whole grid such a network sees context it never saw in training, and may answer
it with false lesion; on tiles of its training crop's edge it sees what it was trained on. A model card
asks for it with ``"inference": {"tile": N}``. Tiles overlap by half; each voxel is taken from the tile
where it lies most centrally (its distance to that tile's centre, along the worst axis, is least), so
every voxel has at least a quarter tile of context on each side that the volume allows.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import Engine, EngineOutput
from .progress import CancelToken, Progress, ProgressCallback


def tile_starts(length: int, tile: int) -> list[int]:
    """First voxels of the tiles along one axis of ``length`` voxels: stride ``tile // 2``, the last
    flush with the end (one tile at 0 when the axis is shorter than a tile)."""
    last = max(0, length - tile)
    return sorted({*range(0, last + 1, max(1, tile // 2)), last})


def run_tiled(engine: Engine, volume: np.ndarray, tile: int, *, probability_classes: Sequence[int] = (),
              progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> EngineOutput:
    """``engine.run`` on ``tile``³ tiles of ``volume`` (zero-padded at each tile's edge, as in training),
    assembled voxel by voxel from the tile where the voxel lies most centrally."""
    stages = Progress(progress, cancel)
    corners = np.stack(np.meshgrid(*[tile_starts(n, tile) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    distance = np.full(volume.shape, np.inf, np.float32)
    warnings: list[str] = []
    output = None
    for index, corner in enumerate(corners):
        stages.check()
        window = tuple(slice(int(c), int(c) + tile) for c in corner)
        part = np.ascontiguousarray(volume[window])
        output = engine.run(part, probability_classes=probability_classes, cancel=cancel,
                            progress=stages.within(index / len(corners), 1 / len(corners),
                                                   f"tile {index + 1} of {len(corners)}"))
        warnings += output.warnings
        if labels is None:
            labels = np.zeros(volume.shape, output.labels.dtype)
            if output.probabilities is not None:
                probabilities = np.zeros((output.probabilities.shape[0], *volume.shape), np.float32)
        axes = [np.abs(np.arange(n, dtype=np.float32) - (n - 1) / 2) for n in part.shape]
        off_centre = np.maximum.reduce(np.meshgrid(*axes, indexing="ij"))
        nearer = off_centre < distance[window]
        labels[window][nearer] = output.labels[nearer]
        if probabilities is not None:
            probabilities[(slice(None), *window)][:, nearer] = output.probabilities[:, nearer]
        distance[window][nearer] = off_centre[nearer]
    assert output is not None and labels is not None       # a volume has at least one tile
    return EngineOutput(labels, probabilities, output.device, output.precision, list(dict.fromkeys(warnings)))
