"""A PNG preview for a quick look: three orthogonal slices through the lesion and a mosaic across its extent.

Every panel carries its orientation (R/L, A/P, S/I at the edges, radiological: the patient's right on
the viewer's left) and the world position of its slice; the title says what was found, and the
footer that this is research software, not for clinical use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .outputs import atomic_file

MOSAIC = 8                     # axial slices across the lesion's (else the head's) extent
FOOTER = "MeshNetLesion research software: not for clinical use"
# Edge letters (left, right, top, bottom) of each view, as the slices are drawn below.
_EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("P", "A", "S", "I")}


def _display(plane: np.ndarray, view: str) -> np.ndarray:
    """A (first axis, second axis) slice turned so the second axis runs up and R is on the viewer's left."""
    shown = plane.T[::-1]
    return shown if view == "sagittal" else shown[:, ::-1]


def write_preview(path: str | os.PathLike, volume: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  title: str = "") -> Path:
    """Write the preview of ``labels`` over ``volume`` (both (i, j, k) with the voxel-to-RAS ``affine``).

    The slices pass through the centroid of the largest labelled component (the volume centre if
    nothing is labelled). Needs matplotlib (``pip install meshnet-lesion[preview]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from scipy import ndimage

    ornt = nib.orientations.io_orientation(affine)          # reorder and flip axes to R, A, S
    image = nib.orientations.apply_orientation(np.asarray(volume, dtype=np.float32), ornt)
    mask = nib.orientations.apply_orientation(np.asarray(labels) > 0, ornt)
    ras_affine = np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(ornt, np.asarray(volume).shape)
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    components, count = ndimage.label(mask)
    if count:
        largest = np.bincount(components.ravel())[1:].argmax() + 1
        centre = np.argwhere(components == largest).mean(axis=0).round().astype(int)
        extent = np.flatnonzero(mask.any(axis=(0, 1)))
    else:
        centre = np.array(image.shape) // 2
        extent = np.flatnonzero((image > np.percentile(image, 75)).any(axis=(0, 1)))
    low, high = np.percentile(image, [1, 99.5])

    def world(axis: int, index: int) -> str:
        point = np.array(image.shape, float) / 2
        point[axis] = index
        value = (ras_affine @ np.r_[point, 1.0])[axis]
        return f"{'RAS'[axis]} {value:+.0f} mm"

    figure = plt.figure(figsize=(12, 9), facecolor="black")
    grid = figure.add_gridspec(3, 12, height_ratios=[1.5, 1, 1])
    views = [("axial", image[:, :, centre[2]], mask[:, :, centre[2]], spacing[1] / spacing[0], world(2, centre[2])),
             ("coronal", image[:, centre[1], :], mask[:, centre[1], :], spacing[2] / spacing[0], world(1, centre[1])),
             ("sagittal", image[centre[0], :, :], mask[centre[0], :, :], spacing[2] / spacing[1], world(0, centre[0]))]
    panels = [(figure.add_subplot(grid[0, 4 * i:4 * i + 4]), *view) for i, view in enumerate(views)]
    levels = np.unique(np.linspace(extent[0], extent[-1], MOSAIC).round().astype(int)) if len(extent) else []
    for n, k in enumerate(levels):
        axis = figure.add_subplot(grid[1 + n // 4, 3 * (n % 4):3 * (n % 4) + 3])
        panels.append((axis, "axial", image[:, :, k], mask[:, :, k], spacing[1] / spacing[0], world(2, k)))
    for axis, view, plane, outline, aspect, where in panels:
        axis.imshow(_display(plane, view), cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        shown = _display(outline, view)
        if shown.any():
            axis.contour(shown.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        left, right, top, bottom = _EDGES[view]
        style = {"color": "yellow", "fontsize": 9, "transform": axis.transAxes, "ha": "center", "va": "center"}
        axis.text(0.03, 0.5, left, **style)
        axis.text(0.97, 0.5, right, **style)
        axis.text(0.5, 0.97, top, **style)
        axis.text(0.5, 0.03, bottom, **style)
        axis.set_title(f"{view}, {where}", color="white", fontsize=9)
        axis.axis("off")
    figure.suptitle(title or "MeshNetLesion", color="white")
    figure.text(0.5, 0.01, FOOTER, color="orange", ha="center", fontsize=9)
    path = Path(path)
    try:
        with atomic_file(path) as partial:
            figure.savefig(partial, dpi=100, facecolor="black", format="png")
    finally:
        plt.close(figure)
    return path
