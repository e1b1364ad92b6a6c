"""Score models on image/mask pairs with the full pipeline, on each image's own grid.

Per subject: Dice, average volume difference, Matthews correlation, predicted and true lesion mL
(mask voxels marked :data:`~.dataset.IGNORE` are left out); per model: the means; between models:
paired Wilcoxon tests on Dice, Holm-corrected. The CLI's ``evaluate`` and the training scripts call
:func:`evaluate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..pipeline import Segmenter
from ..registry import Registry
from ..volume import load_volume
from .dataset import IGNORE, mask_on_source
from .metrics import compare_models, scores

SUMMARY_KEYS = ("dice", "avd", "mcc", "predicted_ml", "true_ml")


def score_subject(segmenter: Segmenter, image_path: Path, mask_path: Path) -> dict[str, Any]:
    """One subject's scores: the pipeline's labels against the mask, outside the not-scored voxels."""
    image = load_volume(image_path)
    truth = mask_on_source(load_volume(mask_path), image, str(mask_path))
    result = segmenter.segment(image)
    scored = truth != IGNORE
    predicted = (result.labels > 0) & scored
    return {"image": str(image_path), **scores(predicted, truth == 1, result.voxel_volume_ml),
            "predicted_ml": float(np.count_nonzero(predicted)) * result.voxel_volume_ml,
            "true_ml": float(np.count_nonzero(truth == 1)) * result.voxel_volume_ml,
            "seconds": result.timings_s["total"]}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Means over subjects (NaN entries, e.g. AVD of an empty truth, left out; None if all are NaN)."""
    return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else None
            for k in SUMMARY_KEYS}


def evaluate(pairs: Sequence[tuple[Path, Path]], models: Sequence[str], *, registry: Registry | None = None,
             device: str = "auto", brain_mask: bool | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every model on every pair: ``{"models": {id: {"subjects": [...], "mean": {...}}}, "wilcoxon_holm_dice": ...}``."""
    registry = registry or Registry()
    report: dict[str, Any] = {"models": {}}
    for model_id in models:
        segmenter = Segmenter(model_id, registry=registry, device=device, brain_mask=brain_mask)
        rows = []
        for image_path, mask_path in pairs:
            rows.append(score_subject(segmenter, Path(image_path), Path(mask_path)))
            if progress is not None:
                row = rows[-1]
                progress(f"{model_id}  {Path(image_path).name}: Dice {row['dice']:.3f}, AVD {row['avd']:.3f}, "
                         f"MCC {row['mcc']:.3f}, lesion {row['predicted_ml']:.1f} mL (truth {row['true_ml']:.1f} mL)")
        summary = summarise(rows)
        report["models"][model_id] = {"subjects": rows, "mean": summary}
        if progress is not None:
            progress(f"{model_id}: mean " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    if len(models) > 1 and len(pairs) > 1:
        report["wilcoxon_holm_dice"] = compare_models(
            {m: [r["dice"] for r in report["models"][m]["subjects"]] for m in models})
        if progress is not None:
            for row in report["wilcoxon_holm_dice"]:
                progress(f"{row['a']} vs {row['b']}: median Dice difference {row['median_difference']:+.3f}, "
                         f"Holm-corrected p {row['p_holm']:.3g}")
    return report
