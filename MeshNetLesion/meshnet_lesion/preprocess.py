"""What the network sees: the model's grid normalised as it was trained, standardised, cropped to the head."""
from __future__ import annotations

import numpy as np

from .spec import Normalization, Standardization

# Fewer brain voxels than this (a tiny or failed brain mask) give no reliable percentiles.
MIN_BRAIN_VOXELS = 50_000

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


def brain_percentiles(x: np.ndarray, brain: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """The intensities of ``x`` at ``percentiles`` of the brain's voxels that carry signal (above 0)."""
    return np.percentile(x[brain & (x > 0)], percentiles).astype(np.float64)


def standardize(x: np.ndarray, brain: np.ndarray, standardization: Standardization) -> np.ndarray | None:
    """``x`` with its brain percentiles moved onto the model's landmarks (see :class:`~.spec.Standardization`).

    0 (the background after normalisation) stays 0; between landmarks the map is linear, above the
    last one its last segment extends, and the result is clipped to [0, 1]. Percentiles that tie
    (a saturated or empty part of the histogram) are skipped. None when the brain mask is too small,
    or its intensities too uniform, for percentiles to mean anything.
    """
    if np.count_nonzero(brain & (x > 0)) < MIN_BRAIN_VOXELS:
        return None
    found = brain_percentiles(x, brain, standardization.percentiles)
    source, target = [0.0], [0.0]
    for value, landmark in zip(found, standardization.landmarks):
        if value > source[-1] + 1e-6 and landmark > target[-1]:
            source.append(float(value))
            target.append(float(landmark))
    if len(source) < 3:
        return None
    out = np.interp(x, source, target)
    above = x > source[-1]
    out[above] = target[-1] + (x[above] - source[-1]) * (target[-1] - target[-2]) / (source[-1] - source[-2])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


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
