"""A PNG preview: three orthogonal slices through the lesion (or the volume centre), lesion outlined."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def write_preview(path: str | os.PathLike, volume: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  title: str = "") -> Path:
    """Render axial, coronal and sagittal slices in RAS orientation with the labels' outlines.

    The slices pass through the centroid of the non-zero labels (the volume centre if none).
    Needs matplotlib (``pip install meshnet-lesion[preview]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # reorder/flip axes to R, A, S
    image = nib.orientations.apply_orientation(np.asarray(volume, dtype=np.float32), ornt)
    mask = nib.orientations.apply_orientation(np.asarray(labels) > 0, ornt)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int)]
    centre = np.argwhere(mask).mean(axis=0).round().astype(int) if mask.any() else np.array(image.shape) // 2
    low, high = np.percentile(image, [1, 99.5])

    views = [("axial", image[:, :, centre[2]], mask[:, :, centre[2]], spacing[1] / spacing[0]),
             ("coronal", image[:, centre[1], :], mask[:, centre[1], :], spacing[2] / spacing[0]),
             ("sagittal", image[centre[0], :, :], mask[centre[0], :, :], spacing[2] / spacing[1])]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for axis, (name, plane, outline, aspect) in zip(axes, views):
        # Transpose so the second array axis runs up the screen; R is shown on the viewer's left
        # for axial and coronal views (radiological convention).
        axis.imshow(plane.T[::-1, ::-1] if name != "sagittal" else plane.T[::-1],
                    cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        shown = outline.T[::-1, ::-1] if name != "sagittal" else outline.T[::-1]
        if shown.any():
            axis.contour(shown.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        axis.set_title(name, color="white")
        axis.axis("off")
    if title:
        figure.suptitle(title, color="white")
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=100, facecolor="black")
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
