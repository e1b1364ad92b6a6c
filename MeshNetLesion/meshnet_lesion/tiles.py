"""Tiled inference: a network run on overlapping cubes of its input instead of the whole box at once.

For models trained on crops smaller than their receptive field (the distilled students: 93 voxels, crops
of 64³ or 96³): on the whole grid such a network sees context it never saw in training, and may answer
it with false lesion; on tiles of its training crop's edge it sees what it was trained on. A model card
asks for it with ``"inference": {"tile": N}``.

The tiles sit on a fixed lattice of the model grid (their corners at multiples of half their edge), not
at the corner of the box the network runs on: that box follows the brain mask, which moves by a voxel
when the intensities change (a gamma, say), and tiles laid from its corner would all move with it and
change about 1 % of a lesion's voxels. Each voxel is taken from the tile whose centre is nearest, so it
has at least a quarter tile of context on each side that the box allows. Tiles are cut to the box; one
that the box cuts to a part of its neighbour's is left out.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .engine import Engine, EngineOutput
from .progress import CancelToken, Progress, ProgressCallback


@dataclass(frozen=True)
class Tile:
    window: tuple[slice, slice, slice]   # what the network sees, in the array's coordinates
    owned: tuple[slice, slice, slice]    # the voxels taken from its answer, in the array's coordinates
    own_in_window: tuple[slice, slice, slice]


def axis_tiles(length: int, tile: int, origin: int = 0) -> list[tuple[slice, slice]]:
    """Along one axis of ``length`` voxels whose first is voxel ``origin`` of the grid: each tile's
    (window, owned voxels) in the axis's own coordinates, windows cut to ``[0, length)``."""
    stride = max(1, tile // 2)
    first = origin // stride                                  # the last lattice tile starting at or before 0
    last = max(first, math.ceil((length + origin - tile) / stride))  # the first reaching the end
    centre = (tile - 1) / 2
    owner = np.clip(np.floor((np.arange(origin, origin + length) - centre) / stride + 0.5).astype(int), first, last)
    tiles = []
    for k in range(first, last + 1):
        own = np.flatnonzero(owner == k)
        start = k * stride - origin
        tiles.append((slice(max(0, start), min(length, start + tile)), slice(int(own[0]), int(own[-1]) + 1)))
    return tiles


def tile_layout(shape: Sequence[int], tile: int, origin: Sequence[int] = (0, 0, 0)) -> list[Tile]:
    """The tiles of an array of ``shape`` whose first voxel is voxel ``origin`` of the model grid."""
    axes = [axis_tiles(n, tile, o) for n, o in zip(shape, origin)]
    layout = []
    for parts in np.ndindex(*(len(a) for a in axes)):
        window = tuple(axes[axis][index][0] for axis, index in enumerate(parts))
        owned = tuple(axes[axis][index][1] for axis, index in enumerate(parts))
        inside = tuple(slice(o.start - w.start, o.stop - w.start) for o, w in zip(owned, window))
        layout.append(Tile(window, owned, inside))      # type: ignore[arg-type]
    return layout


def run_tiled(engine: Engine, volume: np.ndarray, tile: int, *, origin: Sequence[int] = (0, 0, 0),
              probability_classes: Sequence[int] = (), progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None) -> EngineOutput:
    """``engine.run`` on the ``tile``³ tiles of ``volume`` (its first voxel is voxel ``origin`` of the model
    grid), assembled voxel by voxel from the tile whose centre is nearest."""
    stages = Progress(progress, cancel)
    layout = tile_layout(volume.shape, tile, origin)
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    warnings: list[str] = []
    output = None
    for index, part in enumerate(layout):
        stages.check()
        output = engine.run(np.ascontiguousarray(volume[part.window]), probability_classes=probability_classes,
                            cancel=cancel, progress=stages.within(index / len(layout), 1 / len(layout),
                                                                  f"tile {index + 1} of {len(layout)}"))
        warnings += output.warnings
        if labels is None:
            labels = np.zeros(volume.shape, output.labels.dtype)
            if output.probabilities is not None:
                probabilities = np.zeros((output.probabilities.shape[0], *volume.shape), np.float32)
        labels[part.owned] = output.labels[part.own_in_window]
        if probabilities is not None:
            probabilities[(slice(None), *part.owned)] = output.probabilities[(slice(None), *part.own_in_window)]
    assert output is not None and labels is not None       # a volume has at least one tile
    return EngineOutput(labels, probabilities, output.device, output.precision, list(dict.fromkeys(warnings)))
