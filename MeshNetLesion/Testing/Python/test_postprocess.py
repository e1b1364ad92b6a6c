"""Post-processing: brain restriction, minimum size, largest component, on small synthetic grids."""
from __future__ import annotations

import numpy as np

from meshnet_lesion import Volume
from meshnet_lesion.conform import conform
from meshnet_lesion.postprocess import brain_region, labels_to_source, largest_component, lesion_to_source


def _conformed_identity():
    """A source already on the conformed grid, so resampling is exact and effects are isolated."""
    rng = np.random.default_rng(0)
    affine = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    return conform(Volume(rng.integers(1, 255, (256, 256, 256)).astype(np.uint8), affine))


def test_lesion_outside_the_brain_is_removed_and_small_ones_dropped():
    conformed = _conformed_identity()
    probability = np.zeros((256, 256, 256), np.float32)
    probability[100:120, 100:120, 100:120] = 0.9   # 8 mL, inside the brain
    probability[20:30, 20:30, 20:30] = 0.95        # 1 mL, outside the brain ("eye")
    probability[150:152, 150:152, 150:152] = 0.8   # 0.008 mL speck inside the brain
    brain = np.zeros_like(probability, bool)
    brain[60:200, 60:200, 60:200] = True
    labels, source_probability = lesion_to_source(probability, conformed, brain)
    assert labels[25, 25, 25] == 0 and source_probability[25, 25, 25] == 0
    assert labels[110, 110, 110] == 1 and labels[151, 151, 151] == 1
    assert labels.sum() == 8000 + 8
    labels, _ = lesion_to_source(probability, conformed, brain, min_lesion_ml=0.5)
    assert labels.sum() == 8000
    labels, _ = lesion_to_source(probability, conformed, None)
    assert labels[25, 25, 25] == 1  # without the brain mask the "eye" stays


def test_labels_restricted_and_largest_component_kept():
    conformed = _conformed_identity()
    labels = np.zeros((256, 256, 256), np.uint8)
    labels[100:140, 100:140, 100:140] = 1
    labels[100:140, 100:140, 140:150] = 2     # touches the first: same component
    labels[10:14, 10:14, 10:14] = 2           # separate, smaller
    out = labels_to_source(labels, conformed, None, largest=True)
    assert out[12, 12, 12] == 0 and out[120, 120, 145] == 2 and out[120, 120, 120] == 1
    brain = np.ones_like(labels, bool)
    brain[:, :, 145:] = False
    out = labels_to_source(labels, conformed, brain, largest=False)
    assert out[120, 120, 146] == 0 and out[12, 12, 12] == 2


def test_brain_region_fills_enclosed_cavities():
    brain = np.zeros((40, 40, 40), bool)
    brain[5:35, 5:35, 5:35] = True
    brain[15:25, 15:25, 15:25] = False   # a CSF-like cavity the brain model left out
    brain[0:2, 0:2, 0:2] = True          # a stray speck
    region = brain_region(brain)
    assert region[20, 20, 20] and not region[0, 0, 0]
    assert largest_component(brain.astype(np.uint8))[0, 0, 0] == 0
