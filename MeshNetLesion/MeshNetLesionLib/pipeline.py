"""The one segmentation path every front end uses (CLI, Slicer logic, benchmarks, training's validation).

    conform (256³, 1 mm, LIA, uint8) → normalise (per model) → crop to the head (+ margin)
    → [brain-extraction network → brain mask] → network → restrict to brain / largest component
    → uncrop → back to the source grid (lesion probability trilinear, then > 0.5; labels nearest)
    → minimum lesion size (in the source grid, in mL)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import __version__
from .conform import SHAPE, Conformed, conform, to_source
from .engine import CancelToken, Engine, ProgressCallback
from .errors import Cancelled, InputError, ModelError
from .postprocess import brain_region, component_sizes, largest_component, remove_small_components
from .registry import DownloadProgress, Entry, Registry
from .spec import ClassSpec, ModelSpec, Normalization
from .volume import Volume, validate

BRAIN_MODEL_ID = "brainchop-mindgrab"
# Voxels of context kept around the head before inference. MeshNet's receptive field reaches
# ~45 voxels, so cropping changes outputs near the crop border; 32 voxels gave a label map equal
# to whole-grid inference on the ARC sample (18 voxels, T2lesion's choice, changed 6 voxels) at
# ~30 % less compute. A registry entry can set its own ("inference": {"crop_margin": null} runs
# the whole grid, as brainchop does).
CROP_MARGIN = 32
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


def normalize(array: np.ndarray, method: Normalization) -> np.ndarray:
    """Input normalisation over the whole conformed volume, as the model was trained."""
    a = np.asarray(array, dtype=np.float32)
    if method.method == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    lo, hi = np.quantile(a, [method.low, method.high])
    return np.clip((a - lo) / (hi - lo + method.eps), 0.0, 1.0).astype(np.float32)


def head_box(conformed: np.ndarray, margin: int | None) -> tuple[slice, slice, slice]:
    """Bounding box of the non-zero voxels plus ``margin`` (the whole grid if ``margin`` is None)."""
    if margin is None:
        return tuple(slice(0, n) for n in conformed.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(conformed.any(axis=other))
        box.append(slice(max(0, int(hits[0]) - margin), min(conformed.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)  # type: ignore[return-value]


class _Stages:
    """Turns per-stage progress into one monotone 0..1 progress with stage text, and checks cancel."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelToken | None) -> None:
        self.progress, self.cancel, self.done = progress, cancel, 0.0

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("segmentation was cancelled")

    def report(self, fraction: float, stage: str) -> None:
        self.done = max(self.done, min(1.0, fraction))
        if self.progress is not None:
            self.progress(self.done, stage)

    def within(self, start: float, share: float, prefix: str) -> Callable[[float, str], None]:
        return lambda f, stage: self.report(start + share * f, f"{prefix}: {stage}")


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
        self.engine = Engine(self.registry.load(self.entry.id, download_progress), device, precision)
        self.spec: ModelSpec = self.engine.spec
        self.task = self.entry.task or ("lesion" if self.spec.num_classes == 2 else "segmentation")
        if self.task == "lesion" and self.spec.num_classes != 2:
            raise ModelError(f"{self.entry.id}: a lesion model must have 2 classes")
        wants_brain = self.entry.postprocess.get("brain_mask", False) if brain_mask is None else brain_mask
        self.brain_engine: Engine | None = None
        if wants_brain:
            self.brain_engine = Engine(self.registry.load(BRAIN_MODEL_ID, download_progress), device, precision)
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
        stages = _Stages(progress, cancel)
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
                stages: _Stages) -> tuple[np.ndarray, np.ndarray | None]:
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


def lesion_to_source(probability: np.ndarray, conformed: Conformed, brain: np.ndarray | None,
                     min_lesion_ml: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Lesion probability (256³) → restricted to the brain → trilinear onto the source grid → > 0.5,
    then components under ``min_lesion_ml`` (measured on the source grid) removed.

    Interpolating the probability rather than the labels gives smooth boundaries on finer or
    oblique source grids; on the conformed grid itself it equals the argmax.
    """
    if brain is not None:
        probability = np.where(brain, probability, np.float32(0.0))
    source_probability = to_source(probability, conformed, order=1)
    lesion = source_probability > 0.5
    voxel_ml = abs(float(np.linalg.det(conformed.source_affine[:3, :3]))) / 1000.0
    lesion = remove_small_components(lesion, min_lesion_ml / voxel_ml)
    return lesion.astype(np.uint8), source_probability


def labels_to_source(labels: np.ndarray, conformed: Conformed, brain: np.ndarray | None,
                     largest: bool) -> np.ndarray:
    """Class labels (256³) → restricted to the brain → brainchop's largest component → nearest onto the source."""
    if brain is not None:
        labels = np.where(brain, labels, 0).astype(labels.dtype)
    if largest:
        labels = largest_component(labels)
    return to_source(labels, conformed, order=0)


def segment(volume: Volume, model_id: str | None = None, *, probabilities: bool = False,
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            **options: Any) -> SegmentationResult:
    """Load → segment in one call: ``segment(load_volume("t2.nii.gz"))``. Options go to :class:`Segmenter`."""
    return Segmenter(model_id, **options).segment(volume, probabilities=probabilities, progress=progress,
                                                  cancel=cancel)
