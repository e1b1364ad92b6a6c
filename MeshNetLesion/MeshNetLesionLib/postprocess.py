"""Label clean-up: connected components, brainchop's largest-component rule, minimum lesion size."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected, as brainchop (niimath -bwlabel 26)


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component of the non-zero voxels (brainchop's post-processing).

    Ties go to the component that appears first in memory order, as with ``niimath -bwlabel``.
    """
    components, count = ndimage.label(labels > 0, structure=FULL_CONNECTIVITY)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == int(sizes.argmax()), labels, 0).astype(labels.dtype)


def brain_region(brain_labels: np.ndarray) -> np.ndarray:
    """The brain mask from a brain-extraction label map: largest component, holes filled.

    Filling holes keeps a CSF-like chronic lesion cavity inside the mask even where the
    brain-extraction model left it out.
    """
    brain = largest_component((brain_labels > 0).astype(np.uint8)) > 0
    return ndimage.binary_fill_holes(brain)


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components of a binary mask (largest first)."""
    components, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.bincount(components.ravel())[1:])[::-1]


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 26-connected components with fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1:
        return mask
    components, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]
