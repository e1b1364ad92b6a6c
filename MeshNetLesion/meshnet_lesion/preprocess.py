"""What the network sees: the conformed array normalised as each model was trained, cropped to the head."""
from __future__ import annotations

import numpy as np

from .spec import Normalization

# Voxels of context kept around the head before inference. MeshNet's receptive field reaches
# ~45 voxels, so cropping changes outputs near the crop border; 32 voxels gave a label map equal
# to whole-grid inference on the ARC sample (18 voxels, T2lesion's choice, changed 6 voxels) at
# ~30 % less compute. A registry entry can set its own ("inference": {"crop_margin": null} runs
# the whole grid, as brainchop does).
CROP_MARGIN = 32


def normalize(array: np.ndarray, method: Normalization) -> np.ndarray:
    """Input normalisation over the whole conformed volume, as the model was trained."""
    a = np.asarray(array, dtype=np.float32)
    if method.method == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    lo, hi = np.quantile(a, [method.low, method.high])
    return np.clip((a - lo) / (hi - lo + method.eps), 0.0, 1.0).astype(np.float32)


def head_box(conformed: np.ndarray, margin: int | None) -> tuple[slice, slice, slice]:
    """Bounding box of the non-zero voxels plus ``margin`` (the whole grid if ``margin`` is None)."""
    if margin is None:
        return tuple(slice(0, n) for n in conformed.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(conformed.any(axis=other))
        box.append(slice(max(0, int(hits[0]) - margin), min(conformed.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)  # type: ignore[return-value]
