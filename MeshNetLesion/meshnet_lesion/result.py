"""What a segmentation run returns: labels on the source grid and what a report needs. No PyTorch here,
so a front end that runs the network in another process (the Slicer module) can rebuild it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .postprocess import FULL_CONNECTIVITY
from .spec import ClassSpec


@dataclass
class SegmentationResult:
    """Labels (and optional probabilities) on the source grid, with what is needed for a report.

    ``labels`` is (i, j, k) like the input; ``probabilities`` is the lesion probability (i, j, k)
    for lesion models, or (classes, i, j, k) for other models, when asked for.
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None
    model_id: str
    task: str
    classes: tuple[ClassSpec, ...]
    device: str
    precision: str
    brain_mask: bool
    min_lesion_ml: float
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    brain: np.ndarray | None = None  # the brain mask (restriction, standardisation), on the source grid
    standardized: bool = False       # brain intensities were mapped onto the model's landmarks
    mirrored: bool = False           # the lesion model also ran on the scan mirrored left to right
    tile: int | None = None          # the networks ran on tiles of this edge (tiles.py), not the whole box
    model_version: str = ""
    model_files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 (every ensemble member's)
    brain_model: str | None = None   # the brain-extraction model, when one ran
    brain_precision: str | None = None   # the precision it ran in
    software: dict[str, str] = field(default_factory=dict)
    created: str = ""                # UTC, ISO 8601
    summary: dict[str, Any] | None = None  # :meth:`summarize`, computed once (in the worker, for the Slicer module)

    @property
    def voxel_volume_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def is_lesion_model(self) -> bool:
        return self.task == "lesion"

    @property
    def lesion_volume_ml(self) -> float | None:
        if not self.is_lesion_model:
            return None
        return float(np.count_nonzero(self.labels == 1)) * self.voxel_volume_ml

    @property
    def brain_volume_ml(self) -> float | None:
        return None if self.brain is None else float(np.count_nonzero(self.brain)) * self.voxel_volume_ml

    @property
    def lesion_components(self) -> int | None:
        return self.summarize()["lesion_components"]

    def class_volumes_ml(self) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel().astype(np.int64), minlength=len(self.classes))
        return {c.name: float(counts[i]) * self.voxel_volume_ml for i, c in enumerate(self.classes) if i > 0}

    def summarize(self) -> dict[str, Any]:
        """The figures a report and the panel show, and the labels' bounding box (``label_box``: start and stop
        per axis, None without labels), computed once: the panel creates its nodes from these without
        labelling components on Slicer's main thread."""
        from scipy import ndimage

        if self.summary is None:
            found = ndimage.find_objects((self.labels > 0).astype(np.uint8))
            box = [[s.start, s.stop] for s in found[0]] if found and found[0] is not None else None
            count, largest = self._components() if self.is_lesion_model else (None, None)
            self.summary = {
                "lesion_volume_ml": None if self.lesion_volume_ml is None else round(self.lesion_volume_ml, 3),
                "lesion_components": count, "largest_lesion": largest,
                "class_volumes_ml": {k: round(v, 3) for k, v in self.class_volumes_ml().items()},
                "brain_volume_ml": None if self.brain is None else round(self.brain_volume_ml, 3),
                "label_box": box}
        return self.summary

    def largest_lesion(self) -> dict[str, Any] | None:
        """The largest lesion component: its volume, RAS centroid and hemisphere (None without a lesion)."""
        return self.summarize()["largest_lesion"]

    def _components(self) -> tuple[int, dict[str, Any] | None]:
        """The lesion's 26-connected components, labelled once: their number and the largest one."""
        from scipy import ndimage

        components, count = ndimage.label(self.labels == 1, structure=FULL_CONNECTIVITY)
        if count == 0:
            return 0, None
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        centroid, side = place(components == largest, self.affine, self.brain)
        return int(count), {"volume_ml": round(float(sizes[largest - 1]) * self.voxel_volume_ml, 3),
                            "centroid_ras_mm": [round(float(c), 1) for c in centroid], "hemisphere": side}

    def report(self, **extra: Any) -> dict[str, Any]:
        summary = self.summarize()
        return {
            "model": self.model_id,
            "model_version": self.model_version,
            "model_files_sha256": self.model_files,
            "task": self.task,
            "lesion_volume_ml": summary["lesion_volume_ml"],
            "lesion_components": summary["lesion_components"],
            "largest_lesion": summary["largest_lesion"],
            "class_volumes_ml": summary["class_volumes_ml"],
            "brain_mask": self.brain_mask,
            "brain_mask_model": self.brain_model,
            "brain_mask_precision": self.brain_precision,
            "brain_volume_ml": summary["brain_volume_ml"],
            "standardized": self.standardized,
            "mirrored": self.mirrored,
            "tile": self.tile,
            "min_lesion_ml": self.min_lesion_ml,
            "device": self.device,
            "precision": self.precision,
            "shape": list(self.labels.shape),
            "voxel_volume_ml": self.voxel_volume_ml,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "warnings": self.warnings,
            "software": self.software,
            "created": self.created,
            **extra,
        }


def place(region: np.ndarray, affine: np.ndarray, brain: np.ndarray | None) -> tuple[np.ndarray, str]:
    """A region's RAS centroid (mm) and its hemisphere ("left" or "right").

    The midline is the brain's centroid when a brain mask is given, else the centre of the grid:
    world x = 0 need not be the midline of a scan."""
    from scipy import ndimage

    centroid = _world(affine, ndimage.center_of_mass(region))
    middle = (ndimage.center_of_mass(brain) if brain is not None and brain.any()
              else (np.array(region.shape) - 1) / 2)
    return centroid, "right" if centroid[0] > _world(affine, middle)[0] else "left"     # RAS: +x = right


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]
