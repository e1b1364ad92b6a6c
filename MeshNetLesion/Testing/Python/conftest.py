"""Shared fixtures: the real data in ../shared/data is reached only through the registry mirror.

Pure unit tests need no data; tests that do ask for the ``shared`` fixture (directly or through
``registry`` and the fixtures built on it). Without the data they are skipped, unless
``MESHNET_LESION_MIRROR`` names a folder that is missing, which stops the run (CI sets it).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
MIRROR_REQUESTED = bool(os.environ.get("MESHNET_LESION_MIRROR"))
SHARED = Path(os.environ.get("MESHNET_LESION_MIRROR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    """Every test sees the shared data (if here) as the registry mirror and a fresh, private cache."""
    if SHARED.is_dir():
        os.environ["MESHNET_LESION_MIRROR"] = str(SHARED)
    elif MIRROR_REQUESTED:
        pytest.exit(f"MESHNET_LESION_MIRROR names a missing folder: {SHARED}", returncode=2)
    os.environ["MESHNET_LESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def shared(_environment) -> Path:
    """The shared data folder (real scans, weights, lesion masks, reference outputs)."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED} (or MESHNET_LESION_MIRROR)")
    return SHARED


@pytest.fixture(scope="session")
def registry(shared):
    from meshnet_lesion.registry import Registry

    return Registry()


@pytest.fixture(scope="session")
def sample_paths(registry):
    return {entry_id: next(iter(registry.fetch(entry_id).values()))
            for entry_id in ("sample-arc-m2265-t2w", "sample-t1-crop")}


@pytest.fixture(scope="session")
def arc_volume(sample_paths):
    from meshnet_lesion import load_volume

    return load_volume(sample_paths["sample-arc-m2265-t2w"])


@pytest.fixture(scope="session")
def label_head(sample_paths, shared):
    """t1_crop's brainchop subcortical labels (the peer's own output) and a brain mask grown from them."""
    from scipy import ndimage

    from meshnet_lesion import load_volume
    from meshnet_lesion.train import synth

    t1 = load_volume(sample_paths["sample-t1-crop"])
    labels = np.asarray(load_volume(shared / "reference" / "t1_crop.brainchop-0.2.5.subcortical.nii.gz").array)
    brain = ndimage.binary_fill_holes(ndimage.binary_dilation(labels > 0, iterations=2))
    return synth.label_head(t1, labels.astype(np.uint8), brain, "t1_crop")


@pytest.fixture(scope="session")
def arc_part(arc_volume):
    """A 160 x 128 x 128 mm part of M2265 (stored LIA) with its lesion, centred left to right on the scan: the
    networks run on its head box (+ margin) in the conformed grid, about half of the whole scan's."""
    from meshnet_lesion import Volume

    corner = np.array([48, 40, 62])
    affine = arc_volume.affine.copy()
    affine[:3, 3] = arc_volume.affine[:3, :3] @ corner + arc_volume.affine[:3, 3]
    box = tuple(slice(start, start + size) for start, size in zip(corner, (160, 128, 128)))
    return Volume(np.ascontiguousarray(arc_volume.array[box]), affine)


@pytest.fixture(scope="session")
def lesion_segmenter(registry):
    from meshnet_lesion import Segmenter

    return Segmenter(registry=registry, device="cpu")


@pytest.fixture(scope="session")
def arc_result(lesion_segmenter, arc_volume):
    """The default pipeline (brain mask on) on the real ARC scan; computed once per session."""
    return lesion_segmenter.segment(arc_volume, probabilities=True)


@pytest.fixture(scope="session")
def one_pass_segmenter(registry):
    """The default without its mirrored pass, for the robustness tests: the same three models, conform, brain
    mask and standardisation at two thirds of the time. Its results are compared with ``arc_result`` (the
    mirrored pass adds 0.1 mL to M2265's 81.7; the quality suite measured the robustness cases alike with and
    without it)."""
    from meshnet_lesion import Segmenter

    return Segmenter(registry=registry, device="cpu", mirror=False)
