"""The one segmentation path every front end uses (CLI, Slicer logic, benchmarks, training's validation).

    the model's grid (niimath conform, or arc-meshchop's zoom; its axis order) → [brain-extraction
    network on its own grid → brain mask, carried onto the model's grid] → normalise (per model)
    → standardise the brain's intensities onto the model's landmarks → crop to the head (+ margin), or
    to the brain (+ margin, the rest as background) when the labels are restricted to it
    → network (an ensemble: each member, mean of probabilities; a mirrored model: again on the scan
    mirrored left to right, the lesion probability the higher of the two)
    → restrict to brain / largest component → uncrop → back to the source grid (lesion probability
    trilinear, then > 0.5; labels nearest) → minimum lesion size (in the source grid, in mL)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .calibration import auto_precision
from .conform import SHAPE, Conformed, between_grids, conform, reorient, to_source, zoom_to_grid
from .devices import resolve_device
from .engine import Engine, EngineOutput, memory_estimate
from .errors import InputError, ModelError, ResourceError
from .postprocess import brain_region, labels_to_source, lesion_to_source
from .preprocess import CROP_MARGIN, head_box, normalize, standardize
from .progress import CancelToken, Progress, ProgressCallback
from .registry import DownloadProgress, Entry, Registry
from .request import SegmentationRequest
from .result import SegmentationResult
from .spec import InputSpec, LoadedModel, ModelSpec
from .tiles import run_tiled
from .volume import Volume, left_right_axis, validate

BRAIN_MODEL_ID = "brainchop-mindgrab"
# The brain-extraction network runs on the head box plus this margin, as the whole grid would (the
# engine's ``surround``: background outside the crop, GroupNorm over the whole grid). Against
# MindGrab on the whole 256³ grid (lab/benchmarks/brain_mask.py, M2265 / T1 sample): Dice 0.994 / 0.995
# at 0.49 / 0.62 of its time; the lesion model's margin of 32 without surround gave 0.990 / 0.994 at 0.66 / 0.77.
BRAIN_CROP_MARGIN = 16
# A model restricted to the brain runs on the brain's box plus this margin, the rest of the grid as
# background (the engine's ``surround``; exact for models without GroupNorm, whose statistics would
# count the head it leaves out). Against the head box + 32 on M2265 (ensemble of arc-meshnet26):
# margin 24: Dice 0.9998 at 0.55 of the time; margin 16: 0.9964 at 0.40 (one restart: 0.992).
LESION_BRAIN_MARGIN = 24
# Progress shares of conforming at the start and of going back to the source grid at the end.
_CONFORM_SHARE, _FINISH_SHARE = 0.04, 0.06


@dataclass
class ModelInput:
    """A volume on a model's grid: the grid, the head box, the brain mask on the grid, the normalised array."""

    grid: Conformed
    box: tuple[slice, slice, slice]
    brain: np.ndarray | None
    x: np.ndarray
    progress_done: float = 0.0       # the share of a run's progress spent getting here


class Segmenter:
    """Loads a model (an ensemble's members, and the brain-extraction model it needs) once; segments any number of volumes."""

    def __init__(self, model_id: str | None = None, *, registry: Registry | None = None, device: str = "auto",
                 precision: str = "auto", brain_mask: bool | None = None, standardize: bool | None = None,
                 min_lesion_ml: float = 0.0, crop_margin: int | None | str = "auto", mirror: bool | None = None,
                 download_progress: DownloadProgress | None = None) -> None:
        """``brain_mask``: run brain extraction and restrict labels to the brain (None: the model card's
        choice). ``standardize``: map the brain's intensities onto the model's landmarks (None: whenever
        the brain mask is computed and the model has landmarks; True runs brain extraction for it alone).
        ``mirror``: also run a lesion model on the scan mirrored left to right and keep the higher lesion
        probability of the two (None: the model card's choice). The ARC-trained models were trained on an
        aphasia cohort, almost all left-hemisphere lesions, and miss a right-hemisphere one; the mirrored
        pass shows them that lesion on the side they know, at twice the network time."""
        self.registry = registry or Registry()
        self.entry: Entry = self.registry.get(model_id) if model_id else self.registry.default_model()
        if self.entry.kind != "model":
            raise ModelError(f"'{self.entry.id}' is a sample scan, not a model")
        if min_lesion_ml < 0:
            raise InputError("the minimum lesion size cannot be negative")
        started = time.perf_counter()
        device = resolve_device(device)             # once for the run: every network gets the same device
        self.precision_notes: dict[str, str] = {}   # network -> how ``auto`` chose its precision
        self.engines = [self._engine(member.id, self.registry.load(member, download_progress), device, precision)
                        for member in self.registry.members(self.entry)]
        self.spec: ModelSpec = self.engines[0].spec
        def convention(spec: ModelSpec) -> tuple:
            return spec.input, spec.normalization, spec.standardization, spec.num_classes

        if any(convention(engine.spec) != convention(self.spec) for engine in self.engines[1:]):
            raise ModelError(f"ensemble {self.entry.id}: its members differ in input convention or classes")
        self.task = self.entry.task or ("lesion" if self.spec.num_classes == 2 else "segmentation")
        if self.task == "lesion" and self.spec.num_classes != 2:
            raise ModelError(f"{self.entry.id}: a lesion model must have 2 classes")
        runtime = self.entry.runtime                            # how the registry says its model runs
        self.restrict = runtime.brain_mask if brain_mask is None else bool(brain_mask)
        # restricted labels let the networks run on the brain's box (exact only without GroupNorm)
        self.brain_crop = self.restrict and not any(layer.norm == "group" for engine in self.engines
                                                    for layer in engine.spec.layers)
        if standardize and self.spec.standardization is None:
            raise ModelError(f"{self.entry.id} has no reference landmarks to standardise intensities to")
        self.standardize = (self.restrict and self.spec.standardization is not None) if standardize is None \
            else bool(standardize)
        self.brain_engine: Engine | None = None
        if self.restrict or self.standardize:
            brain_entry = self.registry.get(BRAIN_MODEL_ID)
            self.brain_engine = self._engine(brain_entry.id, self.registry.load(brain_entry, download_progress),
                                             device, precision)
        self.mirror = runtime.mirror if mirror is None else bool(mirror)
        if self.mirror and self.task != "lesion":
            raise ModelError(f"{self.entry.id} is not a lesion model: only a lesion model's pass can be mirrored")
        self.tile: int | None = runtime.tile    # run the networks on tiles of this edge (tiles.py)
        self.min_lesion_ml = float(min_lesion_ml)
        if crop_margin == "auto":
            crop_margin = CROP_MARGIN if runtime.crop_margin == "auto" else runtime.crop_margin
        self.crop_margin = crop_margin
        self.load_seconds = time.perf_counter() - started

    def _engine(self, name: str, model: LoadedModel, device: torch.device, precision: str) -> Engine:
        """An engine for one network; ``auto`` precision is the faster one measured on this CPU (see calibration)."""
        if precision == "auto":
            precision, self.precision_notes[name] = auto_precision(model, device, self.registry.cache_dir)
        return Engine(model, device, precision)

    @classmethod
    def for_request(cls, request: SegmentationRequest, registry: Registry | None = None,
                    download_progress: DownloadProgress | None = None) -> Segmenter:
        """The Segmenter a :class:`~.request.SegmentationRequest` asks for."""
        return cls(request.model_id, registry=registry, download_progress=download_progress,
                   **request.segmenter_options())

    @property
    def device(self) -> str:
        return str(self.engines[0].device)

    def segment(self, volume: Volume, *, probabilities: bool = False, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> SegmentationResult:
        """Segment one volume. Raises :class:`InputError` for unusable input, :class:`Cancelled` on cancel,
        :class:`ResourceError` when memory runs out (with how much this model needs).

        One :class:`Segmenter` may be shared between threads: a run keeps its state in local variables
        and the engines only read their prepared weights (tested with three threads at once).
        """
        try:
            return self._segment(volume, probabilities, progress, cancel)
        except MemoryError as error:
            need = max(memory_estimate(e.spec) for e in self._networks) / 2 ** 30 + 1.5  # + volumes and PyTorch
            raise ResourceError(f"not enough memory to segment this scan: {self.entry.id} needs about {need:.1f} GiB; "
                                "close other programs or use a machine with more memory") from error

    def _segment(self, volume: Volume, probabilities: bool, progress: ProgressCallback | None,
                 cancel: CancelToken | None) -> SegmentationResult:
        stages = Progress(progress, cancel)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        started = time.perf_counter()

        validate(volume)
        prepared = self._prepare(volume, stages, timings, warnings)
        grid, box, brain = prepared.grid, prepared.box, prepared.brain
        x = prepared.x
        standardized = False
        if self.standardize:
            tick = time.perf_counter()
            values = standardize(x, brain, self.spec.standardization)
            if values is None:
                warnings.append("the brain mask is too small or too uniform to standardise intensities; "
                                "the model saw the normalised scan as it is")
            else:
                x, standardized = values, True
            timings["standardize"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if self.brain_crop and brain.any():
            box = head_box(brain, LESION_BRAIN_MARGIN)
        x, surround = cropped(x, box) if self.brain_crop else (np.ascontiguousarray(x[box]), 0)
        lesion_task = self.task == "lesion"
        ensemble = len(self.engines) > 1
        wanted = [1] if lesion_task else (list(range(self.spec.num_classes)) if probabilities or ensemble else [])
        axis = left_right_axis(grid.affine) if self.mirror else None
        passes = [x] if axis is None else [x, np.ascontiguousarray(np.flip(x, axis))]
        origins = [tuple(b.start for b in box)]     # where each pass's first voxel lies on the grid (tiles.py)
        if axis is not None:
            origins.append(tuple(SHAPE[a] - b.stop if a == axis else b.start for a, b in enumerate(box)))
        outputs: list[list[EngineOutput]] = [[] for _ in passes]
        position = prepared.progress_done
        for index, engine in enumerate(self.engines):
            share = self._share(engine) / len(passes)
            for side, values in enumerate(passes):
                label = "segmenting" + (f" (model {index + 1} of {len(self.engines)})" if ensemble else "") + \
                    (": mirrored scan" if side else "")
                within = stages.within(position, share, label)
                outputs[side].append(
                    run_tiled(engine, values, self.tile, origin=origins[side], probability_classes=wanted,
                              cancel=stages.cancel, progress=within) if self.tile else
                    engine.run(values, probability_classes=wanted, cancel=stages.cancel, progress=within,
                               surround=surround))
                warnings += outputs[side][-1].warnings
                position += share
        labels_in_box, probabilities_in_box = _combine(outputs[0], lesion_task)
        if axis is not None:
            probabilities_in_box = np.maximum(probabilities_in_box, np.flip(_combine(outputs[1], True)[1], axis + 1))
            labels_in_box = (probabilities_in_box[0] > 0.5).astype(np.uint8)
        timings["network"] = time.perf_counter() - tick

        tick = time.perf_counter()
        stages.report(1 - _FINISH_SHARE, "back to the source grid")
        restriction = brain if self.restrict else None
        labels, probs = self._finish(labels_in_box, probabilities_in_box, grid, box, restriction, lesion_task,
                                     probabilities, stages)
        source_brain = None if brain is None else to_source(brain.view(np.uint8), grid, order=0) > 0
        timings["to_source"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        stages.report(1.0, "done")
        return SegmentationResult(labels, volume.affine.copy(), probs, self.entry.id, self.task, self.spec.classes,
                                  outputs[0][0].device, outputs[0][0].precision, self.restrict, self.min_lesion_ml,
                                  timings, list(dict.fromkeys(warnings)), source_brain, standardized, self.mirror,
                                  tile=self.tile,
                                  model_version=str(self.entry.card.get("version", "")),
                                  model_files={f.name: f.sha256 for member in self.registry.members(self.entry)
                                               for f in member.files},
                                  brain_model=BRAIN_MODEL_ID if self.brain_engine is not None else None,
                                  brain_precision=None if self.brain_engine is None else self.brain_engine.precision,
                                  software={"meshnet_lesion": __version__, "torch": torch.__version__},
                                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def model_input(self, volume: Volume) -> ModelInput:
        """What the network sees for ``volume`` before standardisation: its grid, the brain mask on it (if
        one is computed) and the normalised array (e.g. to work out a model's standardisation landmarks)."""
        validate(volume)
        return self._prepare(volume, Progress(), {}, [])

    def _share(self, engine: Engine) -> float:
        """The share of the whole run's progress that one network takes (by its arithmetic)."""
        return (1 - _CONFORM_SHARE - _FINISH_SHARE) * engine.spec.macs_per_voxel / sum(
            e.spec.macs_per_voxel for e in self._networks)

    @property
    def _networks(self) -> list[Engine]:
        """Every network a run uses: the brain-extraction one (if any), then the model's."""
        return ([self.brain_engine] if self.brain_engine is not None else []) + self.engines

    def _prepare(self, volume: Volume, stages: Progress, timings: dict[str, float], warnings: list[str]) -> ModelInput:
        started = time.perf_counter()
        stages.report(0.0, "conforming to 256³ at 1 mm")
        grids: dict[InputSpec, Conformed] = {}
        grid = model_grid(volume, self.spec.input, grids)
        if not grid.array.any():
            raise InputError("the image is empty after conforming (no voxel above the background)")
        box = head_box(grid.array, self.crop_margin)
        timings["conform"] = time.perf_counter() - started
        stages.check()
        position = _CONFORM_SHARE
        brain = None
        if self.brain_engine is not None:
            tick = time.perf_counter()
            brain_grid = model_grid(volume, self.brain_engine.spec.input, grids)
            brain_box = head_box(brain_grid.array, BRAIN_CROP_MARGIN)
            brain_input, surround = cropped(normalize(brain_grid.array, self.brain_engine.spec.normalization), brain_box)
            share = self._share(self.brain_engine)
            output = self.brain_engine.run(brain_input, progress=stages.within(position, share, "brain mask"),
                                           cancel=stages.cancel, surround=surround)
            warnings += output.warnings
            brain = np.zeros(SHAPE, bool)
            brain[brain_box] = brain_region(output.labels == 1)
            brain = between_grids(brain, brain_grid, grid)
            position += share
            timings["brain_mask"] = time.perf_counter() - tick
        return ModelInput(grid, box, brain, normalize(grid.array, self.spec.normalization), position)

    def _finish(self, labels_in_box: np.ndarray, probabilities_in_box: np.ndarray | None, grid: Conformed, box,
                brain, lesion_task: bool, probabilities: bool, stages: Progress) -> tuple[np.ndarray, np.ndarray | None]:
        if lesion_task:
            probability = np.zeros(SHAPE, np.float32)
            probability[box] = probabilities_in_box[0]
            stages.check()
            labels, source_probability = lesion_to_source(probability, grid, brain, self.min_lesion_ml)
            return labels, (source_probability if probabilities else None)
        labels = np.zeros(SHAPE, labels_in_box.dtype)
        labels[box] = labels_in_box
        stages.check()
        source_labels = labels_to_source(labels, grid, brain, self.entry.runtime.largest_component)
        source_probs = None
        if probabilities:
            source_probs = np.empty((probabilities_in_box.shape[0], *grid.source_shape), np.float32)
            channel = np.zeros(SHAPE, np.float32)
            for index, values in enumerate(probabilities_in_box):
                stages.check()
                channel[box] = values
                to_source(channel, grid, order=1, output=source_probs[index])
        return source_labels, source_probs


def model_grid(volume: Volume, spec: InputSpec, cache: dict[InputSpec, Conformed]) -> Conformed:
    """The 256³ grid a model sees (its recipe, then its axis order), made once per recipe and volume."""
    if spec not in cache:
        made = conform(volume) if spec.grid == "conform" else zoom_to_grid(volume)
        cache[spec] = reorient(made, spec.orientation)
    return cache[spec]


def cropped(x: np.ndarray, box: tuple[slice, ...]) -> tuple[np.ndarray, int]:
    """``x[box]`` as a contiguous array, and how many voxels of ``x`` it leaves out (the engine's ``surround``)."""
    crop = np.ascontiguousarray(x[box])
    return crop, x.size - crop.size


def _combine(outputs: list[EngineOutput], lesion_task: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One model's labels and probabilities, or an ensemble's: the mean of its members' probabilities."""
    if len(outputs) == 1:
        return outputs[0].labels, outputs[0].probabilities
    mean = np.mean([o.probabilities for o in outputs], axis=0, dtype=np.float32)
    labels = (mean[0] > 0.5).astype(np.uint8) if lesion_task else mean.argmax(axis=0).astype(outputs[0].labels.dtype)
    return labels, mean


def segment(volume: Volume, model_id: str | None = None, *, probabilities: bool = False,
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            **options: Any) -> SegmentationResult:
    """Load → segment in one call: ``segment(load_volume("t2.nii.gz"))``. Options go to :class:`Segmenter`."""
    return Segmenter(model_id, **options).segment(volume, probabilities=probabilities, progress=progress,
                                                  cancel=cancel)
