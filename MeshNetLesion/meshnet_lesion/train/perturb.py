"""Realistic changes to a real scan, for measuring how robust a model is (``lab/benchmarks/quality.py``, tests).

Each function returns a new :class:`~.volume.Volume` (the input is never modified) with what
scanners, sites and preprocessing tools actually change: skull-stripping and cropping, the
intensity scale, a non-linear intensity response, a smooth bias field, integer storage, and thick
or coarse voxels (averaged over the new voxel, as a scanner's slice profile does). A lesion found
on one of them can be compared with the lesion found on the original with :func:`onto`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..volume import Volume, left_right_axis


def skull_stripped(volume: Volume, brain: np.ndarray, margin: int = 8) -> Volume:
    """Voxels outside ``brain`` set to zero, then cropped to the brain's box plus ``margin`` voxels."""
    inside = np.argwhere(brain)
    lo = np.maximum(inside.min(axis=0) - margin, 0)
    hi = np.minimum(inside.max(axis=0) + 1 + margin, volume.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    array = np.where(brain, volume.array, 0).astype(volume.array.dtype)[box]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ lo + volume.affine[:3, 3]
    return Volume(np.ascontiguousarray(array), affine)


def scaled(volume: Volume, factor: float) -> Volume:
    """Every intensity times ``factor`` (another scanner's or site's scale), as float32."""
    return Volume(np.asarray(volume.array, np.float32) * np.float32(factor), volume.affine.copy())


def gamma(volume: Volume, exponent: float) -> Volume:
    """A non-linear intensity response: ``max · (x / max) ** exponent`` (contrast between tissues changes)."""
    array = np.asarray(volume.array, np.float32)
    top = float(array.max())
    return Volume((np.clip(array, 0, None) / top) ** np.float32(exponent) * np.float32(top), volume.affine.copy())


def bias_field(volume: Volume, amplitude: float = 0.2) -> Volume:
    """A smooth multiplicative field between 1 − ``amplitude`` and 1 + ``amplitude`` across the volume."""
    x, y, z = np.meshgrid(*(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in volume.shape), indexing="ij")
    field = 0.5 * x + 0.3 * y - 0.4 * z + 0.3 * x * y
    field = 1.0 + amplitude * field / np.abs(field).max()
    return Volume(np.asarray(volume.array, np.float32) * field, volume.affine.copy())


def integer_storage(volume: Volume, bits: int = 12) -> Volume:
    """Rescaled to 0 … 2**bits − 1 and rounded into int16 (as many DICOM series store T2w)."""
    array = np.asarray(volume.array, np.float32)
    lo, hi = float(array.min()), float(array.max())
    top = 2 ** bits - 1
    return Volume(np.round((array - lo) / (hi - lo) * top).astype(np.int16), volume.affine.copy())


def resampled(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """Voxels of ``spacing`` mm along the world R, A, S axes (e.g. 1×1×3 mm thick axial slices).

    Each new voxel is the average over its extent (a box slice profile), sampled on a grid aligned
    with the source's axes; the source must be axis-aligned with isotropic voxels.
    """
    directions = np.abs(volume.affine[:3, :3])
    source_spacing = directions.max(axis=0)
    world_axis = directions.argmax(axis=0)                    # which of R, A, S each array axis runs along
    factors = np.array([spacing[world_axis[i]] / source_spacing[i] for i in range(3)])
    smoothed = ndimage.uniform_filter(np.asarray(volume.array, np.float32),
                                      size=[max(1, int(round(f))) for f in factors])
    shape = tuple(int(n) for n in np.floor(np.array(volume.shape) / factors))
    offset = (factors - 1.0) / 2.0
    array = ndimage.affine_transform(smoothed, np.diag(factors), offset=offset, output_shape=shape, order=1)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(factors)
    affine[:3, 3] = volume.affine[:3, :3] @ offset + volume.affine[:3, 3]
    return Volume(array, affine)


def left_right_flipped(volume: Volume) -> Volume:
    """The head mirrored left to right (the same grid): a left-hemisphere lesion becomes a right one."""
    axis = left_right_axis(volume.affine)
    return Volume(np.ascontiguousarray(np.flip(volume.array, axis)), volume.affine.copy())


def mirrored_healthy_hemisphere(volume: Volume, lesioned_side: str = "L") -> Volume:
    """The ``lesioned_side`` hemisphere replaced by the mirror image of the other: a lesion-free scan.

    The midline is the centroid of the head along the left–right axis (the volume must be
    axis-aligned, as conformed scans are).
    """
    array = np.array(volume.array, copy=True)
    axis = left_right_axis(volume.affine)
    increasing_right = volume.affine[0, axis] > 0
    moved = np.moveaxis(array, axis, 0)
    head = np.argwhere(moved > np.percentile(moved, 75))
    midline = int(head[:, 0].mean())
    # indices on the lesioned side: towards L if i increases to the right, else the other way
    lesion_towards_high = (lesioned_side.upper() == "L") != increasing_right
    n = moved.shape[0]
    for i in range(n):
        twin = 2 * midline - i
        if (i > midline if lesion_towards_high else i < midline) and 0 <= twin < n:
            moved[i] = moved[twin]
    return Volume(array, volume.affine.copy())


def onto(labels: np.ndarray, origin: Volume, target: Volume) -> np.ndarray:
    """Binary labels on ``origin``'s grid brought onto ``target``'s (through world space; linear, > 0.5)."""
    matrix = np.linalg.inv(origin.affine) @ target.affine      # target voxel → origin voxel
    if np.allclose(matrix, np.eye(4), atol=1e-6) and origin.shape == target.shape:
        return np.asarray(labels) > 0
    return ndimage.affine_transform((np.asarray(labels) > 0).astype(np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=target.shape, order=1) > 0.5
