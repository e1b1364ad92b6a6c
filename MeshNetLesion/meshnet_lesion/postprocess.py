"""After the network: brain restriction, connected components, brainchop's largest-component rule,
minimum lesion size, and the way back from the conformed grid to the source grid."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .conform import Conformed, to_source

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


def lesion_to_source(probability: np.ndarray, conformed: Conformed, brain: np.ndarray | None,
                     min_lesion_ml: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Lesion probability (256³) → restricted to the brain → trilinear onto the source grid → > 0.5,
    then components under ``min_lesion_ml`` (measured on the source grid) removed.

    Interpolating the probability rather than the labels gives smooth boundaries on finer or
    oblique source grids; on the conformed grid itself it equals the argmax.
    """
    if brain is not None:
        probability = np.where(brain, probability, np.float32(0.0))
    source_probability = to_source(probability, conformed, order=1)
    lesion = source_probability > 0.5
    voxel_ml = abs(float(np.linalg.det(conformed.source_affine[:3, :3]))) / 1000.0
    lesion = remove_small_components(lesion, min_lesion_ml / voxel_ml)
    return lesion.astype(np.uint8), source_probability


def labels_to_source(labels: np.ndarray, conformed: Conformed, brain: np.ndarray | None,
                     largest: bool) -> np.ndarray:
    """Class labels (256³) → restricted to the brain → brainchop's largest component → nearest onto the source."""
    if brain is not None:
        labels = np.where(brain, labels, 0).astype(labels.dtype)
    if largest:
        labels = largest_component(labels)
    return to_source(labels, conformed, order=0)
