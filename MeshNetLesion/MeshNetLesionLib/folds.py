"""Nested cross-validation folds as in the MeshNet paper: 3 outer × 3 inner, stratified by lesion-volume
quartile and acquisition type, so every fold sees small and large lesions and both sequences.

The strata come from the paper's cut points on the ARC lesion volumes (in 1 mm³ voxels); the split
itself is scikit-learn's :class:`~sklearn.model_selection.StratifiedKFold`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# ARC lesion volumes (voxels): minimum, the three quartiles, maximum. Values outside fall into the
# first or last stratum.
VOLUME_CUT_POINTS = (203, 33_619, 67_891, 128_314, 363_885)


def volume_stratum(voxels: int) -> int:
    """The lesion-volume quartile (0..3) of a lesion of ``voxels`` 1 mm³ voxels."""
    return int(np.clip(np.searchsorted(VOLUME_CUT_POINTS[1:-1], voxels, side="right"), 0, 3))


@dataclass(frozen=True)
class Fold:
    """Indices into the subject list: the outer test set, and the inner (train, validation) splits."""

    outer: int
    test: tuple[int, ...]
    inner: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @property
    def train_all(self) -> tuple[int, ...]:
        """Every subject outside the test set (the final model of the fold is trained on these)."""
        return tuple(sorted(set(self.inner[0][0]) | set(self.inner[0][1])))


def strata(lesion_voxels: Sequence[int], acquisitions: Sequence[str]) -> np.ndarray:
    """One label per subject: volume quartile × acquisition type."""
    if len(lesion_voxels) != len(acquisitions):
        raise ValueError("one acquisition type per subject is needed")
    kinds = sorted(set(acquisitions))
    return np.array([volume_stratum(v) * len(kinds) + kinds.index(a) for v, a in zip(lesion_voxels, acquisitions)])


def nested_folds(lesion_voxels: Sequence[int], acquisitions: Sequence[str], outer: int = 3, inner: int = 3,
                 seed: int = 0) -> list[Fold]:
    """Stratified outer folds, each with stratified inner folds over its training subjects."""
    from sklearn.model_selection import StratifiedKFold

    labels = strata(lesion_voxels, acquisitions)
    subjects = np.arange(len(labels))
    folds = []
    splitter = StratifiedKFold(n_splits=outer, shuffle=True, random_state=seed)
    for index, (train, test) in enumerate(splitter.split(subjects, labels)):
        inner_splitter = StratifiedKFold(n_splits=inner, shuffle=True, random_state=seed + 1 + index)
        splits = tuple((tuple(int(i) for i in train[a]), tuple(int(i) for i in train[b]))
                       for a, b in inner_splitter.split(train, labels[train]))
        folds.append(Fold(index, tuple(int(i) for i in test), splits))
    return folds
