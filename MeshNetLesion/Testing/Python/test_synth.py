"""The synthetic-lesion generator, with real lesion masks (SOOP) placed into real heads."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from meshnet_lesion import load_volume
from meshnet_lesion.train import synth
from meshnet_lesion.train.dataset import IGNORE, load_training_pair, read_pairs


@pytest.fixture(scope="module")
def soop(shared):
    """The 1,449 real SOOP stroke lesion masks (MNI space)."""
    return sorted((shared / "lesions" / "soop").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def real_head(arc_volume, arc_result):
    """M2265 with its own lesion (found by the ARC-trained model) excluded, as `synth --t2` builds it."""
    return synth.real_head(arc_volume, arc_result.brain, arc_result.labels == 1, "M2265")


def test_lesion_split_is_stable_disjoint_and_about_a_tenth(soop):
    train, test = synth.split_lesions(soop)
    assert len(soop) > 1000 and not set(train) & set(test) and len(train) + len(test) == len(soop)
    assert 0.07 < len(test) / len(soop) < 0.13
    assert synth.split_lesions(list(reversed(soop))) == (train, test)


def test_placed_lesions_keep_a_plausible_size_and_stay_in_parenchyma(real_head, soop):
    rng = np.random.default_rng(0)
    checked = 0
    for path in soop[:40:4]:
        source = synth.LesionSource.load(path)
        placed = synth.place_lesion(source, real_head, rng)
        if placed is None:
            continue
        fraction, box = placed
        inside = fraction > 0.5
        assert real_head.placeable[box][inside].all()
        assert not real_head.ignore[box][fraction > 0].any()
        # box alignment and ±15 % scaling change the volume, clipping to parenchyma removes some
        assert 0.2 < inside.sum() / source.array.sum() < 3.0, path.name
        checked += 1
    assert checked >= 5


def test_real_head_rendering_marks_its_own_lesion_and_paints_hyperintense_lesions(real_head, arc_volume, soop):
    before = arc_volume.array.copy()
    image, mask, info = synth.render(real_head, [synth.LesionSource.load(p) for p in soop[:2]],
                                     np.random.default_rng(5))
    assert np.array_equal(arc_volume.array, before)           # the real scan is never modified
    assert image.dtype == np.uint8 and image.shape == synth.SHAPE and mask.shape == synth.SHAPE
    lesion = mask == 1
    assert info["lesion_voxels"] == lesion.sum() > 100
    assert np.array_equal(mask == IGNORE, real_head.ignore & ~lesion) and not (lesion & real_head.ignore).any()
    assert real_head.placeable[lesion].all()
    core = ndimage.binary_erosion(lesion, iterations=2)
    assert image[core].mean() > image[real_head.placeable & ~lesion].mean() + 20   # T2-bright


def test_label_head_rendering_is_reproducible_and_lesion_free_has_no_lesion(label_head, soop):
    masks = [synth.LesionSource.load(p) for p in soop[10:12]]
    first = synth.render(label_head, masks, np.random.default_rng([7, 0]))
    second = synth.render(label_head, masks, np.random.default_rng([7, 0]))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2]["lesion_voxels"] > 0 and set(np.unique(first[1])) == {0, 1}
    image, mask, info = synth.render(label_head, [], np.random.default_rng(8))
    assert not mask.any() and info["lesions"] == [] and image.max() == 255
    assert not np.array_equal(image, first[0])
    # the anatomy drawn from a rendering's seed is that rendering's: its CSF is bright, its white matter dark
    own, other = (synth.anatomy(label_head, np.random.default_rng(seed)) for seed in (8, [7, 0]))
    contrast = [image[tissues == synth.CSF].mean() - image[tissues == synth.WHITE].mean() for tissues in (own, other)]
    assert contrast[0] > 2 * max(contrast[1], 0) and contrast[0] > 50, contrast


def test_written_dataset_reads_back_as_training_pairs(real_head, tmp_path, soop):
    pairs_csv = synth.write_dataset(tmp_path / "set", real_head, soop[:20], count=2, seed=3)
    pairs = read_pairs(pairs_csv)
    assert [p[0].name for p in pairs] == ["000_T2w.nii.gz", "001_T2w.nii.gz"]
    image, mask = load_training_pair(*pairs[0])
    assert image.shape == synth.SHAPE and 0 <= image.min() and image.max() <= 1
    assert IGNORE in mask and set(np.unique(mask)) <= {0, 1, IGNORE}
    record = (tmp_path / "set" / "synth.json").read_text()
    assert '"seed": 3' in record and "bwsrsub-" in record
    again = synth.write_dataset(tmp_path / "again", real_head, soop[:20], count=2, seed=3, workers=2)
    assert (load_volume(again.parent / "001_T2w.nii.gz").array == load_volume(pairs[1][0]).array).all()


def test_measured_contrast_is_m2265s_own_and_renders_a_lesion_free_head_in_t2_order(arc_volume, arc_result,
                                                                                     label_head):
    contrast = synth.measured_contrast(arc_volume.array, arc_result.brain)
    white, grey, csf = contrast[[synth.WHITE, synth.CORTEX, synth.CSF]]
    # M2265's brain clusters, relative to its 99.9th percentile (measured: 0.27, 0.52, 0.88)
    assert 0.2 < white < 0.35 and 0.42 < grey < 0.6 and 0.75 < csf < 0.98
    assert white < contrast[synth.DEEP_GREY] < grey and contrast[synth.PALLIDUM] < white
    assert list(contrast[list(synth.HEAD_TISSUES)]) == sorted(contrast[list(synth.HEAD_TISSUES)])
    image, mask, info = synth.render(label_head, [], np.random.default_rng(9), contrast=contrast)
    assert info["contrast"] == "measured" and info["gamma"] == 1.0 and not mask.any()
    # the centre of the head is brain: its three intensity clusters keep M2265's white : grey : CSF ratios
    centre = image[88:168, 88:168, 88:168].astype(np.float32).ravel()[::7]
    rendered = synth._clusters(centre)
    assert np.allclose(rendered / rendered[2], np.array([white, grey, csf]) / csf, atol=0.05)
