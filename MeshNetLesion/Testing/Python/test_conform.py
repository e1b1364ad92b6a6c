"""Conform against the real ``niimath -conform`` binary (PyPI package niimath), and its inverse."""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from meshnet_lesion import InputError, Volume, load_volume, save_volume
from meshnet_lesion.conform import LIA_DIRECTIONS, conform, to_source
from meshnet_lesion.train.metrics import dice


def _niimath(path, tmp_path):
    exe = shutil.which("niimath")
    if exe is None:
        import niimath

        exe = str(niimath.bin_path)
    out = tmp_path / "niimath_conformed.nii"
    subprocess.run([exe, str(path), "-conform", "-gz", "0", str(out), "-odt", "char"], check=True,
                   capture_output=True)
    image = nib.load(out)
    return np.asarray(image.dataobj), image.affine


def _oblique_volume(source: Volume, spacing=(0.9, 0.9, 3.0), angles=(12, -7, 20), shape=(230, 240, 60),
                    dtype=np.float32, scale=1.0) -> Volume:
    """Resample ``source`` onto an oblique, anisotropic, RAS-stored grid centred on the same point."""
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    centre = source.affine @ np.r_[np.array(source.shape) / 2.0, 1.0]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ (np.array(shape) / 2.0)
    matrix = np.linalg.inv(source.affine) @ affine
    data = ndimage.affine_transform(np.asarray(source.array, np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=shape, order=1)
    return Volume((data * scale).astype(dtype), affine)


@pytest.mark.parametrize("entry", ["sample-arc-m2265-t2w", "sample-t1-crop"])
def test_matches_niimath_exactly_on_real_scans(entry, sample_paths, tmp_path):
    expected, expected_affine = _niimath(sample_paths[entry], tmp_path)
    got = conform(load_volume(sample_paths[entry]))
    assert got.array.shape == (256, 256, 256) and got.array.dtype == np.uint8
    assert np.abs(got.affine - expected_affine).max() < 1e-3
    assert np.array_equal(got.array, expected)


@pytest.mark.parametrize("dtype, scale", [(np.int16, 7.0), (np.float32, 0.37)])
def test_close_to_niimath_on_oblique_anisotropic_input(dtype, scale, arc_volume, tmp_path):
    volume = _oblique_volume(arc_volume, dtype=dtype, scale=scale)
    path = save_volume(tmp_path / "oblique.nii.gz", volume.array, volume.affine)
    expected, expected_affine = _niimath(path, tmp_path)
    got = conform(load_volume(path))
    assert np.abs(got.affine - expected_affine).max() < 1e-3
    difference = np.abs(got.array.astype(int) - expected)
    assert difference.max() <= 1
    assert np.count_nonzero(difference) / difference.size < 1e-4  # measured: ~2e-5 (float rounding order)


def test_conformed_grid_is_lia_1mm_centred_on_the_source():
    volume = Volume(np.random.default_rng(0).random((64, 80, 40)).astype(np.float32), np.diag([2.0, 1.5, 3.0, 1]))
    got = conform(volume)
    assert np.allclose(got.affine[:3, :3], LIA_DIRECTIONS)
    centre_source = volume.affine @ np.r_[np.array(volume.shape) / 2.0, 1]
    assert np.allclose(got.affine @ np.array([128, 128, 128, 1.0]), centre_source)


def _sphere_volume(affine: np.ndarray, shape, centre_ras, radius_mm) -> Volume:
    ijk = np.indices(shape).reshape(3, -1)
    ras = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)
    inside = np.linalg.norm(ras - np.asarray(centre_ras)[:, None, None, None], axis=0) <= radius_mm
    image = np.where(inside, 200.0, 20.0).astype(np.float32)
    return Volume(image, affine)


def _grid(kind: str):
    if kind == "RAS":
        return np.diag([1.0, 1.0, 1.0, 1.0]), (120, 130, 110)
    if kind == "LPS":  # as DICOM/ITK store it: i to the left, j to the back
        return np.diag([-1.0, -1.0, 1.0, 1.0]), (120, 130, 110)
    if kind == "oblique":
        affine = np.eye(4)
        affine[:3, :3] = Rotation.from_euler("zyx", [25, 10, -15], degrees=True).as_matrix() * 1.1
        return affine, (110, 120, 100)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])  # anisotropic
    return affine, (170, 150, 48)


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique", "anisotropic"])
def test_round_trip_keeps_world_position(kind):
    affine, shape = _grid(kind)
    affine = affine.copy()
    affine[:3, 3] = -(affine[:3, :3] @ (np.array(shape) / 2.0)) + np.array([5.0, -8.0, 12.0])
    centre = np.array([18.0, -20.0, 25.0])
    volume = _sphere_volume(affine, shape, centre, radius_mm=14.0)
    truth = volume.array > 100
    conformed = conform(volume)
    # the sphere sits at the same world position in the conformed grid
    ijk = np.argwhere(conformed.array > 110).mean(axis=0)
    assert np.linalg.norm((conformed.affine @ np.r_[ijk, 1])[:3] - centre) < 1.0
    back = to_source((conformed.array > 110).astype(np.uint8), conformed, order=0)
    assert back.shape == volume.shape
    assert dice(back, truth) >= 0.95
    probability = to_source((conformed.array > 110).astype(np.float32), conformed, order=1)
    assert dice(probability > 0.5, truth) >= 0.95


def test_input_is_not_modified(arc_volume):
    before = arc_volume.array.copy()
    conform(arc_volume)
    assert np.array_equal(arc_volume.array, before)


@pytest.mark.parametrize("array, message", [
    (np.ones((10, 10, 10, 3), np.float32), "3D"),
    (np.ones((64, 64), np.float32), "3D"),
    (np.ones((64, 64, 1), np.float32), "2D"),
    (np.zeros((20, 20, 20), np.float32), "constant"),
    (np.where(np.eye(20)[None] > 0, np.nan, 1.0).repeat(20, 0), "NaN"),
    (np.where(np.eye(20)[None] > 0, np.inf, 1.0).repeat(20, 0), "infinite"),
])
def test_bad_volumes_are_refused(array, message):
    with pytest.raises(InputError, match=message):
        conform(Volume(array, np.eye(4)))


def test_degenerate_affine_is_refused():
    with pytest.raises(InputError, match="degenerate"):
        conform(Volume(np.random.default_rng(0).random((8, 8, 8)), np.diag([1.0, 0.0, 1.0, 1.0])))
