"""The one segmentation path every front end uses (CLI, Slicer logic, benchmarks, training's validation).

    conform (256³, 1 mm, LIA, uint8) → normalise (per model) → crop to the head (+ margin)
    → [brain-extraction network → brain mask] → network → restrict to brain / largest component
    → uncrop → back to the source grid (lesion probability trilinear, then > 0.5; labels nearest)
    → minimum lesion size (in the source grid, in mL)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._version import __version__
from .conform import SHAPE, Conformed, conform, to_source
from .engine import Engine
from .errors import InputError, ModelError
from .postprocess import brain_region, component_sizes, labels_to_source, lesion_to_source
from .preprocess import CROP_MARGIN, head_box, normalize
from .progress import CancelToken, Progress, ProgressCallback
from .registry import DownloadProgress, Entry, Registry
from .spec import ClassSpec, ModelSpec
from .volume import Volume, validate

BRAIN_MODEL_ID = "brainchop-mindgrab"
# Progress shares of conforming at the start and of going back to the source grid at the end.
_CONFORM_SHARE, _FINISH_SHARE = 0.04, 0.06


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
    brain: np.ndarray | None = None  # the brain mask used to restrict labels, on the source grid

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
        return len(component_sizes(self.labels == 1)) if self.is_lesion_model else None

    def class_volumes_ml(self) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel().astype(np.int64), minlength=len(self.classes))
        return {c.name: float(counts[i]) * self.voxel_volume_ml for i, c in enumerate(self.classes) if i > 0}

    def report(self, **extra: Any) -> dict[str, Any]:
        import torch

        return {
            "model": self.model_id,
            "task": self.task,
            "lesion_volume_ml": None if self.lesion_volume_ml is None else round(self.lesion_volume_ml, 3),
            "lesion_components": self.lesion_components,
            "class_volumes_ml": {k: round(v, 3) for k, v in self.class_volumes_ml().items()},
            "brain_mask": self.brain_mask,
            "brain_volume_ml": None if self.brain is None else round(self.brain_volume_ml, 3),
            "min_lesion_ml": self.min_lesion_ml,
            "device": self.device,
            "precision": self.precision,
            "shape": list(self.labels.shape),
            "voxel_volume_ml": self.voxel_volume_ml,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "warnings": self.warnings,
            "software": {"meshnet_lesion": __version__, "torch": torch.__version__},
            **extra,
        }


class Segmenter:
    """Loads a model (and the brain-extraction model it needs) once; segments any number of volumes."""

    def __init__(self, model_id: str | None = None, *, registry: Registry | None = None, device: str = "auto",
                 precision: str = "auto", brain_mask: bool | None = None, min_lesion_ml: float = 0.0,
                 crop_margin: int | None | str = "auto", download_progress: DownloadProgress | None = None) -> None:
        self.registry = registry or Registry()
        self.entry: Entry = self.registry.get(model_id) if model_id else self.registry.default_model()
        if self.entry.kind != "model":
            raise ModelError(f"'{self.entry.id}' is a sample scan, not a model")
        if min_lesion_ml < 0:
            raise InputError("the minimum lesion size cannot be negative")
        started = time.perf_counter()
        self.engine = Engine(self.registry.load(self.entry, download_progress), device, precision)
        self.spec: ModelSpec = self.engine.spec
        self.task = self.entry.task or ("lesion" if self.spec.num_classes == 2 else "segmentation")
        if self.task == "lesion" and self.spec.num_classes != 2:
            raise ModelError(f"{self.entry.id}: a lesion model must have 2 classes")
        wants_brain = self.entry.postprocess.get("brain_mask", False) if brain_mask is None else brain_mask
        self.brain_engine: Engine | None = None
        if wants_brain:
            brain_entry = self.registry.get(BRAIN_MODEL_ID)
            self.brain_engine = Engine(self.registry.load(brain_entry, download_progress), device, precision)
        self.min_lesion_ml = float(min_lesion_ml)
        self.crop_margin = (self.entry.card.get("inference", {}).get("crop_margin", CROP_MARGIN)
                            if crop_margin == "auto" else crop_margin)
        self.load_seconds = time.perf_counter() - started

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def segment(self, volume: Volume, *, probabilities: bool = False, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> SegmentationResult:
        """Segment one volume. Raises :class:`InputError` for unusable input, :class:`Cancelled` on cancel."""
        stages = Progress(progress, cancel)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        started = time.perf_counter()

        validate(volume)
        stages.report(0.0, "conforming to 256³ at 1 mm")
        conformed = conform(volume)
        box = head_box(conformed.array, self.crop_margin) if conformed.array.any() else None
        if box is None:
            raise InputError("the image is empty after conforming (no voxel above the background)")
        timings["conform"] = time.perf_counter() - started
        stages.check()

        networks = [e for e in (self.brain_engine, self.engine) if e is not None]
        costs = [e.spec.macs_per_voxel for e in networks]
        shares = [(1 - _CONFORM_SHARE - _FINISH_SHARE) * c / sum(costs) for c in costs]
        position = _CONFORM_SHARE
        brain = None
        if self.brain_engine is not None:
            tick = time.perf_counter()
            output = self._run(self.brain_engine, conformed, box, (), stages.within(position, shares[0], "brain mask"),
                               cancel)
            warnings += output.warnings
            brain = np.zeros(SHAPE, bool)
            brain[box] = brain_region(output.labels == 1)
            position += shares[0]
            timings["brain_mask"] = time.perf_counter() - tick

        tick = time.perf_counter()
        lesion_task = self.task == "lesion"
        wanted = [1] if lesion_task else (list(range(self.spec.num_classes)) if probabilities else [])
        output = self._run(self.engine, conformed, box, wanted, stages.within(position, shares[-1], "segmenting"),
                           cancel)
        warnings += output.warnings
        timings["network"] = time.perf_counter() - tick

        tick = time.perf_counter()
        stages.report(1 - _FINISH_SHARE, "back to the source grid")
        labels, probs = self._finish(output, conformed, box, brain, lesion_task, probabilities, stages)
        source_brain = None if brain is None else to_source(brain.view(np.uint8), conformed, order=0) > 0
        timings["to_source"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        stages.report(1.0, "done")
        return SegmentationResult(labels, volume.affine.copy(), probs, self.entry.id, self.task, self.spec.classes,
                                  output.device, output.precision, brain is not None, self.min_lesion_ml, timings,
                                  warnings, source_brain)

    def _run(self, engine: Engine, conformed: Conformed, box, classes, progress, cancel):
        x = normalize(conformed.array, engine.spec.normalization)[box]
        return engine.run(np.ascontiguousarray(x), probability_classes=classes, progress=progress, cancel=cancel)

    def _finish(self, output, conformed: Conformed, box, brain, lesion_task: bool, probabilities: bool,
                stages: Progress) -> tuple[np.ndarray, np.ndarray | None]:
        if lesion_task:
            probability = np.zeros(SHAPE, np.float32)
            probability[box] = output.probabilities[0]
            stages.check()
            labels, source_probability = lesion_to_source(probability, conformed, brain, self.min_lesion_ml)
            return labels, (source_probability if probabilities else None)
        labels = np.zeros(SHAPE, output.labels.dtype)
        labels[box] = output.labels
        stages.check()
        source_labels = labels_to_source(labels, conformed, brain,
                                         bool(self.entry.postprocess.get("largest_component", False)))
        source_probs = None
        if probabilities:
            source_probs = np.empty((output.probabilities.shape[0], *conformed.source_shape), np.float32)
            channel = np.zeros(SHAPE, np.float32)
            for index, values in enumerate(output.probabilities):
                stages.check()
                channel[box] = values
                to_source(channel, conformed, order=1, output=source_probs[index])
        return source_labels, source_probs


def segment(volume: Volume, model_id: str | None = None, *, probabilities: bool = False,
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            **options: Any) -> SegmentationResult:
    """Load → segment in one call: ``segment(load_volume("t2.nii.gz"))``. Options go to :class:`Segmenter`."""
    return Segmenter(model_id, **options).segment(volume, probabilities=probabilities, progress=progress,
                                                  cancel=cancel)
