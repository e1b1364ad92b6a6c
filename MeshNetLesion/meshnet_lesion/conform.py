"""Conform any scalar volume to 256³, 1 mm, LIA, uint8 — as ``niimath -conform`` does — and back.

``niimath -conform`` (the step brainchop and the ARC-trained T2lesion model were fed by) does:

1. intensities: a 1000-bin histogram from the minimum (negative values ignored when under 2 %
   of voxels) to the value under which 98 % of the non-zero voxels fall; map that range to
   0..255 and clip — in float32;
2. geometry: a 256³ 1 mm grid with FreeSurfer's LIA axes (i → left, j → inferior, k → anterior)
   whose centre voxel (128, 128, 128) lands on the world position of the source voxel
   (nx/2, ny/2, nz/2);
3. trilinear resampling in float32; an output voxel whose 2×2×2 source neighbourhood is not
   wholly inside the source keeps the fill value (the scaled minimum, normally 0);
4. rounding to uint8 (half away from zero).

This module re-implements those steps in numpy with the same float32 arithmetic order, so the
result can be compared voxel for voxel with the binary from the ``niimath`` PyPI package.

:func:`zoom_to_grid` is the other recipe a published model was trained on (the arc-meshchop
replication of the paper): closest canonical axes, ``scipy.ndimage.zoom`` to 1 mm, centred crop
or pad, raw intensities. :func:`reorient` flips and swaps a grid's axes into the order a network
expects. Every grid keeps its exact voxel-to-RAS matrix, so :func:`to_source` resamples labels or
probabilities back onto the source grid whichever recipe made it, and :func:`between_grids`
carries a mask from one recipe's grid to another's.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .volume import Volume, validate

SHAPE = (256, 256, 256)
# FreeSurfer "LIA": the rows of the direction matrix are R, A, S; the columns are i, j, k.
LIA_DIRECTIONS = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
F_HIGH = np.float32(0.98)
HISTOGRAM_BINS = 1000
_SLAB = 16  # output slices resampled at a time (bounds the temporary arrays to a few MB)


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _in_slabs(count: int, step: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(start, stop)`` over ``range(count)`` in slabs on all cores.

    numpy and scipy.ndimage release the GIL inside these loops and each slab writes its own part
    of the output, so threads give the same bytes as one loop, about twice as fast on 2 cores.
    """
    starts = range(0, count, step)
    with ThreadPoolExecutor(max_workers=min(_workers(), len(starts))) as pool:
        for done in [pool.submit(work, start, min(start + step, count)) for start in starts]:
            done.result()


@dataclass(frozen=True)
class Conformed:
    """A conformed image and the geometry that links it to its source.

    ``array`` is (i, j, k), 256³ uint8; ``affine`` maps its voxels to RAS; ``source_to_conformed``
    maps a source voxel index to a (fractional) conformed voxel index.
    """

    array: np.ndarray
    affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    @property
    def source_to_conformed(self) -> np.ndarray:
        return np.linalg.inv(self.affine) @ self.source_affine


def conform(volume: Volume) -> Conformed:
    """Return ``volume`` conformed to 256³ 1 mm LIA uint8. The input is never modified."""
    validate(volume)
    scaled = scale_intensities(volume.array)
    out_affine = conformed_affine(volume.shape, volume.affine)
    array = _reslice_linear(scaled, volume.affine, out_affine)
    return Conformed(array, out_affine.astype(np.float64), tuple(volume.shape), volume.affine.copy())


def scale_intensities(array: np.ndarray) -> np.ndarray:
    """niimath's robust 0..255 scaling (``f_high`` = 0.98) in float32; returns a new array."""
    img = np.array(array, dtype=np.float32, copy=True)
    flat = img.ravel(order="K")  # a view whatever the memory order (the statistics ignore it)
    voxels = flat.size
    src_min = np.float32(flat.min())
    src_max = np.float32(flat.max())
    nonzero = int(np.count_nonzero(np.abs(flat) >= 1e-15))
    if src_min < 0 and 100.0 * np.count_nonzero(flat < 0) / voxels < 2.0:
        src_min = np.float32(0.0)
    bin_size = np.float32((src_max - src_min) / np.float32(HISTOGRAM_BINS))
    if bin_size > 0:
        bins = np.trunc((flat - src_min) / bin_size)
        bins = np.clip(bins, 0, HISTOGRAM_BINS - 1).astype(np.int64)
        cumulative = np.cumsum(np.bincount(bins, minlength=HISTOGRAM_BINS))
        nth = voxels - int((1.0 - float(F_HIGH)) * nonzero)
        reached = np.nonzero(cumulative[1:] >= nth)[0]
        idx = int(reached[0]) if reached.size else HISTOGRAM_BINS - 1
        src_max = np.float32(np.float32(idx) * bin_size + src_min)
    scale = np.float32(255.0) / (src_max - src_min) if src_max != src_min else np.float32(1.0)
    np.subtract(img, src_min, out=img)
    np.multiply(img, scale, out=img)
    np.clip(img, 0.0, 255.0, out=img)
    return img


def conformed_affine(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The voxel-to-RAS matrix of the conformed grid (float32 arithmetic, as niimath)."""
    a = np.asarray(affine, dtype=np.float32)
    half = np.array([shape[0] / 2.0, shape[1] / 2.0, shape[2] / 2.0, 1.0], dtype=np.float32)
    centre = np.zeros(4, dtype=np.float32)
    for j in range(4):  # accumulate left to right, as the C loop does
        centre = centre + a[:, j] * half[j]
    out = np.eye(4, dtype=np.float32)
    out[:3, :3] = LIA_DIRECTIONS
    out[:3, 3] = centre[:3] - LIA_DIRECTIONS @ np.array([128.0, 128.0, 128.0], dtype=np.float32)
    return out


def _reslice_linear(img: np.ndarray, src_affine: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
    a32 = np.asarray(src_affine, dtype=np.float32)
    inv_out = _mat44_inverse(out_affine)
    vox2vox = np.zeros((4, 4), dtype=np.float32)
    for k in range(4):  # nifti_mat44_mul sums the four products left to right in float
        vox2vox = vox2vox + inv_out[:, k:k + 1] * a32[k:k + 1, :]
    m = _mat44_inverse(vox2vox)  # conformed voxel -> source voxel

    dim_x, dim_y, dim_z = img.shape
    source = np.asfortranarray(img).reshape(-1, order="F")  # x fastest, as in the file
    fill = np.float32(source.min())
    out = np.empty(SHAPE[::-1], dtype=np.uint8)  # (z, y, x): x fastest in memory
    x = np.arange(SHAPE[0], dtype=np.float32)
    y = np.arange(SHAPE[1], dtype=np.float32)[:, None]
    one = np.float32(1.0)

    def slab(z0: int, z1: int) -> None:
        z = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        coords = []
        for row in range(3):
            yz = (y * m[row, 1] + z * m[row, 2]) + m[row, 3]
            coords.append(x * m[row, 0] + yz)
        ix, iy, iz = coords
        fx, fy, fz = np.floor(ix), np.floor(iy), np.floor(iz)
        inside = ((fx >= 0) & (fy >= 0) & (fz >= 0)
                  & (fx + 1 < dim_x) & (fy + 1 < dim_y) & (fz + 1 < dim_z))
        dx, dy, dz = ix - fx, iy - fy, iz - fz
        wx0, wy0, wz0 = one - dx, one - dy, one - dz
        base = (np.where(inside, fx, 0).astype(np.int64)
                + np.where(inside, fy, 0).astype(np.int64) * dim_x
                + np.where(inside, fz, 0).astype(np.int64) * (dim_x * dim_y))
        sx, sy, sz = 1, dim_x, dim_x * dim_y
        value = source[base] * wx0 * wy0 * wz0
        value += source[base + sz] * wx0 * wy0 * dz
        value += source[base + sy] * wx0 * dy * wz0
        value += source[base + sy + sz] * wx0 * dy * dz
        value += source[base + sx] * dx * wy0 * wz0
        value += source[base + sx + sz] * dx * wy0 * dz
        value += source[base + sx + sy] * dx * dy * wz0
        value += source[base + sx + sy + sz] * dx * dy * dz
        out[z0:z1] = _round_to_uint8(np.where(inside, value, fill))

    _in_slabs(SHAPE[2], _SLAB, slab)
    return out.transpose(2, 1, 0)  # (i, j, k) view


def _mat44_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of an affine 4x4 by cofactors in double, rounded to float32 (nifti_mat44_inverse)."""
    r = np.asarray(matrix, dtype=np.float32).astype(np.float64)
    (r11, r12, r13, v1), (r21, r22, r23, v2), (r31, r32, r33, v3) = r[0], r[1], r[2]
    det = (r11 * r22 * r33 - r11 * r32 * r23 - r21 * r12 * r33
           + r21 * r32 * r13 + r31 * r12 * r23 - r31 * r22 * r13)
    d = 1.0 / det if det != 0 else 0.0
    q = np.array([
        [d * (r22 * r33 - r32 * r23), d * (-r12 * r33 + r32 * r13), d * (r12 * r23 - r22 * r13),
         d * (-r12 * r23 * v3 + r12 * v2 * r33 + r22 * r13 * v3
              - r22 * v1 * r33 - r32 * r13 * v2 + r32 * v1 * r23)],
        [d * (-r21 * r33 + r31 * r23), d * (r11 * r33 - r31 * r13), d * (-r11 * r23 + r21 * r13),
         d * (r11 * r23 * v3 - r11 * v2 * r33 - r21 * r13 * v3
              + r21 * v1 * r33 + r31 * r13 * v2 - r31 * v1 * r23)],
        [d * (r21 * r32 - r31 * r22), d * (-r11 * r32 + r31 * r12), d * (r11 * r22 - r21 * r12),
         d * (-r11 * r22 * v3 + r11 * r32 * v2 + r21 * r12 * v3
              - r21 * r32 * v1 - r31 * r12 * v2 + r31 * r22 * v1)],
        [0.0, 0.0, 0.0, 1.0 if det != 0 else 0.0]])
    return q.astype(np.float32)


def _round_to_uint8(value: np.ndarray) -> np.ndarray:
    v = value.astype(np.float64)
    rounded = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def zoom_to_grid(volume: Volume) -> Conformed:
    """The arc-meshchop preprocessing geometry, step for step (their ``preprocess_volume``, ``scipy_zoom``).

    1. ``nibabel.as_closest_canonical``: axes flipped and swapped to the closest RAS+ order (no
       resampling; an oblique scan keeps its tilt);
    2. float32 intensities, unscaled;
    3. ``scipy.ndimage.zoom(order=1)`` by the voxel spacing, to about 1 mm (the zoom's corner-aligned
       grid: the first and last voxel centres stay where they were);
    4. centred crop, then centred zero padding, to 256³.

    The returned grid is RAS+ and its affine says where each of its voxels lies in the world.
    """
    import nibabel as nib
    from scipy import ndimage

    validate(volume)
    affine = np.asarray(volume.affine, np.float64)
    ornt = nib.orientations.io_orientation(affine)
    data = np.asarray(volume.array)
    if not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        data = nib.orientations.apply_orientation(data, ornt)
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    data = np.asarray(data, dtype=np.float32)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zoomed = ndimage.zoom(data, [float(s) for s in spacing], order=1)
    # ndimage.zoom (grid_mode=False) maps output index o to input index o·(n_in − 1)/(n_out − 1).
    scale = [(n_in - 1) / (n_out - 1) if n_out > 1 else 0.0 for n_in, n_out in zip(data.shape, zoomed.shape)]
    out = np.zeros(SHAPE, np.float32)
    source, target, shift = [], [], []
    for n, size in zip(zoomed.shape, SHAPE):
        crop = (n - size) // 2 if n > size else 0
        kept = min(n, size)
        pad = (size - kept) // 2
        source.append(slice(crop, crop + kept))
        target.append(slice(pad, pad + kept))
        shift.append(crop - pad)            # grid index g holds zoomed index g + crop − pad
    out[tuple(target)] = zoomed[tuple(source)]
    grid_to_canonical = np.diag([*scale, 1.0])
    grid_to_canonical[:3, 3] = np.asarray(scale) * np.asarray(shift)
    return Conformed(out, affine @ grid_to_canonical, tuple(volume.shape), volume.affine.copy())


def reorient(grid: Conformed, orientation: str) -> Conformed:
    """The same grid with its axes flipped and swapped to ``orientation`` (e.g. ``RAS``); exact, no resampling."""
    import nibabel as nib

    current = nib.orientations.io_orientation(grid.affine)
    wanted = nib.orientations.axcodes2ornt(tuple(orientation))
    transform = nib.orientations.ornt_transform(current, wanted)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return grid
    array = nib.orientations.apply_orientation(grid.array, transform)
    affine = grid.affine @ nib.orientations.inv_ornt_aff(transform, grid.array.shape)
    return Conformed(array, affine, grid.source_shape, grid.source_affine)


def between_grids(values: np.ndarray, origin: Conformed, target: Conformed) -> np.ndarray:
    """Labels on ``origin``'s grid resampled (nearest) onto ``target``'s; a copy when the grids coincide."""
    from scipy import ndimage

    matrix = np.linalg.inv(origin.affine) @ target.affine      # target voxel → origin voxel
    if np.allclose(matrix, np.eye(4), atol=1e-6):
        return np.array(values, copy=True)
    return ndimage.affine_transform(np.asarray(values), matrix[:3, :3], offset=matrix[:3, 3], output_shape=SHAPE,
                                    order=0, mode="constant", cval=0)


def to_source(conformed_values: np.ndarray, conformed: Conformed, *, order: int,
              output: np.ndarray | None = None) -> np.ndarray:
    """Resample a 256³ (i, j, k) array from the conformed grid onto the source grid.

    ``order`` 0 (nearest) for labels, 1 (trilinear) for probabilities. Points outside the
    conformed box get 0. The result has ``conformed.source_shape``.
    """
    from scipy import ndimage

    matrix = conformed.source_to_conformed
    if output is None:
        output = np.empty(conformed.source_shape, conformed_values.dtype)

    def slab(i0: int, i1: int) -> None:  # source rows i0..i1: the same transform, offset by i0 rows
        ndimage.affine_transform(
            conformed_values, matrix[:3, :3], offset=matrix[:3, 3] + matrix[:3, 0] * i0,
            output_shape=output[i0:i1].shape, output=output[i0:i1], order=order, mode="constant", cval=0.0,
            prefilter=False)

    _in_slabs(conformed.source_shape[0], max(1, -(-conformed.source_shape[0] // (4 * _workers()))), slab)
    return output


def to_conformed(source_values: np.ndarray, conformed: Conformed) -> np.ndarray:
    """A source-grid label array (e.g. a lesion mask) on the conformed 256³ grid, nearest neighbour."""
    from scipy import ndimage

    matrix = np.linalg.inv(conformed.source_to_conformed)     # conformed voxel → source voxel
    return ndimage.affine_transform(np.asarray(source_values, np.uint8), matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=SHAPE, order=0, mode="constant", cval=0)
