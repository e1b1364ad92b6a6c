"""Reading and writing volumes: NIfTI, MGH, NRRD (LPS and RAS), Slicer's (k, j, i) arrays."""
from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest

from meshnet_lesion import InputError, Volume, load_volume, save_volume


@pytest.fixture
def oblique_volume():
    affine = np.array([[0.9, 0.1, 0.0, -100.0], [-0.1, 0.9, 0.2, -110.0], [0.0, -0.2, 2.5, -60.0], [0, 0, 0, 1]])
    return Volume(np.random.default_rng(0).integers(0, 1000, (30, 40, 20)).astype(np.int16), affine)


def test_mgz_is_read_with_its_affine(oblique_volume, tmp_path):
    nib.save(nib.MGHImage(oblique_volume.array, oblique_volume.affine), tmp_path / "scan.mgz")
    got = load_volume(tmp_path / "scan.mgz")
    assert np.array_equal(got.array, oblique_volume.array)
    assert np.allclose(got.affine, oblique_volume.affine, atol=1e-5)


@pytest.mark.parametrize("space, flip", [("left-posterior-superior", [-1, -1, 1]), ("right-anterior-superior", [1, 1, 1])])
def test_nrrd_space_is_converted_to_ras(space, flip, oblique_volume, tmp_path):
    f = np.diag(flip).astype(float)
    header = {"space": space, "space directions": (f @ oblique_volume.affine[:3, :3]).T,
              "space origin": f @ oblique_volume.affine[:3, 3]}
    nrrd.write(str(tmp_path / "scan.nrrd"), oblique_volume.array, header)
    got = load_volume(tmp_path / "scan.nrrd")
    assert np.array_equal(got.array, oblique_volume.array)
    assert np.allclose(got.affine, oblique_volume.affine)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd"])
def test_save_round_trip_is_atomic(name, oblique_volume, tmp_path):
    path = save_volume(tmp_path / name, oblique_volume.array, oblique_volume.affine, label=True)
    got = load_volume(path)
    assert np.array_equal(got.array, oblique_volume.array)
    assert np.allclose(got.affine, oblique_volume.affine, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
    with pytest.raises(InputError, match="unsupported output format"):
        save_volume(tmp_path / "out.png", oblique_volume.array, oblique_volume.affine)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_trailing_singleton_dimension_is_dropped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 9, 10, 1), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
    assert load_volume(tmp_path / "s.nii.gz").shape == (8, 9, 10)


def test_slicer_kji_arrays_become_ijk():
    kji = np.arange(2 * 3 * 4).reshape(4, 3, 2)  # Slicer: arrayFromVolume is (k, j, i)
    volume = Volume.from_kji(kji, np.eye(4))
    assert volume.shape == (2, 3, 4) and volume.array[1, 2, 3] == kji[3, 2, 1]
