"""Shared fixtures: the real data in ../shared/data is reached only through the registry mirror."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("MESHNET_LESION_MIRROR") or REPO.parent / "shared" / "data")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    """Every test sees the shared data as the registry mirror and a fresh, private cache."""
    if not SHARED.is_dir():
        pytest.exit(f"the shared data folder is missing: {SHARED} (set MESHNET_LESION_MIRROR)", returncode=2)
    os.environ["MESHNET_LESION_MIRROR"] = str(SHARED)
    os.environ["MESHNET_LESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def registry(_environment):
    from MeshNetLesionLib.registry import Registry

    return Registry()


@pytest.fixture(scope="session")
def sample_paths(registry):
    return {entry_id: next(iter(registry.fetch(entry_id).values()))
            for entry_id in ("sample-arc-m2265-t2w", "sample-t1-crop")}


@pytest.fixture(scope="session")
def arc_volume(sample_paths):
    from MeshNetLesionLib import load_volume

    return load_volume(sample_paths["sample-arc-m2265-t2w"])


@pytest.fixture(scope="session")
def lesion_segmenter(registry):
    from MeshNetLesionLib import Segmenter

    return Segmenter(registry=registry, device="cpu")


@pytest.fixture(scope="session")
def arc_result(lesion_segmenter, arc_volume):
    """The default pipeline (brain mask on) on the real ARC scan; computed once per session."""
    return lesion_segmenter.segment(arc_volume, probabilities=True)
