"""``meshnet-lesion`` as a user runs it: a subprocess, real files, exit codes and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import nibabel as nib
import nrrd
import numpy as np
import pytest

CLI = [sys.executable, "-m", "meshnet_lesion.cli"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())


def _write_lps_nrrd(path, image):
    """The same voxels and world grid as ``image``, stored the way Slicer/ITK write NRRD (LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, 3]
    nrrd.write(str(path), np.asarray(image.dataobj), {"space": "left-posterior-superior",
                                                       "space directions": lps.T, "space origin": origin})


@pytest.mark.slow
def test_segment_batch_with_all_outputs(sample_paths, tmp_path):
    """Two inputs in one call (NIfTI and the same scan as an LPS NRRD): same lesion, every output written."""
    source = sample_paths["sample-arc-m2265-t2w"]
    image = nib.load(source)
    _write_lps_nrrd(tmp_path / "M2265_copy.nrrd", image)
    out, reports, probs, previews = (tmp_path / name for name in ("out", "reports", "probs", "previews"))
    for folder in (out, reports, probs, previews):
        folder.mkdir()
    done = run("segment", source, tmp_path / "M2265_copy.nrrd", "-o", out, "--report", reports,
               "--probabilities", probs, "--preview", previews, "--no-brain-mask", "--device", "cpu",
               "--model", "meshnet5-arc26", "--mirror")       # the smallest lesion model: 6 s a pass here
    assert done.returncode == 0, done.stderr
    first = nib.load(out / "M2265_T2w_seg.nii.gz")
    second = nib.load(out / "M2265_copy_seg.nii.gz")
    assert first.shape == image.shape and np.allclose(first.affine, image.affine)
    assert np.allclose(second.affine, image.affine, atol=1e-4)
    assert np.array_equal(np.asarray(first.dataobj), np.asarray(second.dataobj))
    assert set(np.unique(np.asarray(first.dataobj))) == {0, 1}
    report = json.loads((reports / "M2265_T2w_report.json").read_text())
    for key in ("lesion_volume_ml", "model", "device", "timings_s"):
        assert key in report
    assert report["model"] == "meshnet5-arc26" and report["device"] == "cpu" and not report["brain_mask"]
    assert report["mirrored"]                  # asked for: a student runs one pass unless told
    assert report["lesion_volume_ml"] > 20 and report["timings_s"]["network"] > 0
    # provenance: the model's version and file hashes, the brain-mask model (none here), a timestamp
    from meshnet_lesion.registry import Registry

    entry = Registry().get("meshnet5-arc26")
    assert report["model_version"] == entry.card["version"]
    assert report["model_files_sha256"] == {f.name: f.sha256 for f in entry.files}
    assert report["brain_mask_model"] is None
    assert abs(datetime.fromisoformat(report["created"]) - datetime.now(timezone.utc)) < timedelta(hours=1)
    # the ARC participant's lesion is in the left hemisphere (an aphasia cohort; visible on the preview)
    assert report["largest_lesion"]["hemisphere"] == "left"
    assert report["largest_lesion"]["volume_ml"] == pytest.approx(report["lesion_volume_ml"], rel=0.05)
    probability = nib.load(probs / "M2265_T2w_prob.nii.gz")
    assert probability.get_data_dtype() == np.float32 and probability.shape == image.shape
    assert (previews / "M2265_T2w_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{report['lesion_volume_ml']:.2f} mL in {report['lesion_components']} component(s)" in done.stdout


@pytest.mark.slow
def test_minimum_lesion_size_option(sample_paths, tmp_path):
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "l.nii.gz", "--report",
               tmp_path / "r.json", "--no-brain-mask", "--min-lesion-ml", "100", "-q", "--model", "meshnet5-arc26",
               "--no-mirror")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lesion_volume_ml"] == 0 and not report["mirrored"]
    assert np.asarray(nib.load(tmp_path / "l.nii.gz").dataobj).max() == 0


def _save(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: _save(d / "four_d.nii.gz", np.ones((20, 20, 20, 3), np.float32)), "3D"),
    (lambda d: _save(d / "flat.nii.gz", np.random.default_rng(0).random((64, 64, 1)).astype(np.float32)), "2D"),
    (lambda d: _save(d / "zeros.nii.gz", np.zeros((30, 30, 30), np.float32)), "constant"),
    (lambda d: _save(d / "nan.nii.gz", np.where(np.random.default_rng(0).random((30, 30, 30)) > 0.5, np.nan,
                                                1.0).astype(np.float32)), "NaN"),
    (lambda d: d / "missing.nii.gz", "no such file"),
    (lambda d: _corrupt_gzip(d / "corrupt.nii.gz"), "cannot read"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(make, message, tmp_path, shared):
    """The default model loads first (from the mirror), then the input is refused."""
    source = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    done = run("segment", source, "-o", out / "lesion.nii.gz", "--report", out / "r.json", "--no-brain-mask")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshnet-lesion: error:") and message in lines[0], done.stderr
    assert list(out.iterdir()) == []


def _corrupt_gzip(path):
    path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    return path


def test_unknown_model_and_bad_output_paths(sample_paths, tmp_path):
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "l.nii.gz", "--model", "nope")
    assert done.returncode == 2 and "unknown model id 'nope'" in done.stderr
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "no" / "l.nii.gz")
    assert done.returncode == 2 and "folder does not exist" in done.stderr
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "l.png")
    assert done.returncode == 2 and ".nii.gz" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_device_is_a_clear_error(sample_paths, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "l.nii.gz", "--device", "cuda")
    assert done.returncode == 2 and "device 'cuda' was requested but" in done.stderr


def test_models_commands(registry, tmp_path):
    listing = run("models", "list")
    assert listing.returncode == 0
    assert "* arc-meshnet26 " in listing.stdout and "sample-arc-m2265-t2w" in listing.stdout
    card = json.loads(run("models", "show", "brainchop-mindgrab", "--json").stdout)
    assert card["license"] == "MIT" and card["metrics"]
    fetched = run("models", "fetch", "sample-t1-crop")
    assert fetched.returncode == 0 and fetched.stdout.strip().endswith("t1_crop.nii.gz")

    folder = tmp_path / "lesion-copy"
    folder.mkdir()
    for name, path in registry.fetch("t2lesion-meshnet11").items():
        shutil.copy(path, folder / name)
    assert run("models", "import", folder, "--title", "A copy").returncode == 0
    assert "lesion-copy" in run("models", "list").stdout
    assert "inference" not in json.loads(run("models", "show", "lesion-copy", "--json").stdout)
    done = run("models", "import", folder, "--id", "tiled-copy", "--tile", "8")
    assert done.returncode == 2 and "--tile must be at least 16 voxels" in done.stderr
    assert run("models", "import", folder, "--id", "tiled-copy", "--tile", "96").returncode == 0
    assert json.loads(run("models", "show", "tiled-copy", "--json").stdout)["inference"] == {"tile": 96}
    assert run("models", "remove", "tiled-copy").returncode == 0
    assert run("models", "remove", "lesion-copy").returncode == 0
    assert "lesion-copy" not in run("models", "list").stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(folder / "model.json", broken / "model.json")
    (broken / "model.bin").write_bytes(b"\0" * 100)
    done = run("models", "import", broken)
    assert done.returncode == 2 and "manifest" in done.stderr
    assert "broken" not in run("models", "list").stdout
