"""Lesion segmentation metrics as the MeshNet paper reports them, and the paired tests between models.

- Dice: 2|P∩T| / (|P| + |T|); 1 when both are empty (nothing to find, nothing found), unless the
  caller says otherwise.
- Average volume difference (AVD): |V(P) − V(T)| / V(T), the relative error of the lesion volume;
  undefined (NaN) when the truth is empty, where :func:`volume_difference_ml` still applies.
- Matthews correlation coefficient over all voxels (true negatives count, unlike Dice).
- Paired Wilcoxon signed-rank tests between models on the same subjects, Holm-corrected.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np


def _confusion(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return tp, fp, fn, p.size - tp - fp - fn


def dice(prediction: np.ndarray, truth: np.ndarray, *, empty: float = 1.0) -> float:
    """Dice of the non-zero voxels; ``empty`` when both are empty (1: nothing to find, nothing found)."""
    tp, fp, fn, _ = _confusion(prediction, truth)
    return empty if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def average_volume_difference(prediction: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn, _ = _confusion(prediction, truth)
    true_volume = tp + fn
    return math.nan if true_volume == 0 else abs((tp + fp) - true_volume) / true_volume


def volume_difference_ml(prediction: np.ndarray, truth: np.ndarray, voxel_ml: float = 0.001) -> float:
    """Predicted minus true lesion volume in mL (1 mm³ voxels by default)."""
    return (int(np.count_nonzero(np.asarray(prediction) > 0)) - int(np.count_nonzero(np.asarray(truth) > 0))) * voxel_ml


def matthews(prediction: np.ndarray, truth: np.ndarray) -> float:
    """MCC; 0 when a row or column of the confusion matrix is empty (the usual convention)."""
    tp, fp, fn, tn = (float(v) for v in _confusion(prediction, truth))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def scores(prediction: np.ndarray, truth: np.ndarray, voxel_ml: float = 0.001) -> dict[str, float]:
    return {"dice": dice(prediction, truth), "avd": average_volume_difference(prediction, truth),
            "mcc": matthews(prediction, truth), "volume_difference_ml": volume_difference_ml(prediction, truth,
                                                                                             voxel_ml)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def compare_models(per_subject: Mapping[str, Sequence[float]]) -> list[dict[str, float | str]]:
    """Two-sided paired Wilcoxon signed-rank test for every pair of models, Holm-corrected.

    ``per_subject`` maps a model name to its metric (e.g. Dice) on the same subjects in the same order.
    """
    from scipy.stats import wilcoxon

    names = list(per_subject)
    lengths = {len(per_subject[name]) for name in names}
    if len(lengths) > 1:
        raise ValueError("every model must be scored on the same subjects")
    rows = []
    for a, b in itertools.combinations(names, 2):
        x, y = np.asarray(per_subject[a], float), np.asarray(per_subject[b], float)
        p = 1.0 if np.allclose(x, y) else float(wilcoxon(x, y).pvalue)
        rows.append({"a": a, "b": b, "median_difference": float(np.median(x - y)), "p": p})
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
    return rows
