"""``train --teacher``'s recipe: a student learns a registry model's soft targets on crops of the given volumes,
with training-split lesions painted in and label-head renderings if asked, resumable from its state file."""
from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError
from ...registry import Registry, sha256_of
from ...volume import load_volume
from ..training import TrainConfig
from . import run as distill_run
from . import samples as distill_samples


@dataclass(frozen=True)
class Recipe:
    """A distillation as the command line asks for it (``meshnet-lesion train --teacher``; its help says each)."""

    images: tuple[Path, ...]
    output: Path
    teacher: str
    steps: int = 2000
    temperature: float = 2.0
    distill_weight: float = 0.7
    save_every: int = 50
    state: Path | None = None
    teacher_cache: Path | None = None
    lesions: Path | None = None
    gamma: float = distill_samples.GAMMA
    bias_field: float = distill_samples.BIAS_FIELD
    init: Path | None = None
    label_head: Path | None = None
    renderings: int = 8
    workers: int = 0
    crop: int | None = None
    seed: int = 0
    session_steps: int | None = None
    unfinished: bool = False


def distill_student(recipe: Recipe, config: TrainConfig, progress: Callable[..., None] = print) -> Path | None:
    """Run (or continue) the recipe; the student's file once the run is done (or ``unfinished``), else None."""
    from ...pipeline import Segmenter
    from ..model import MeshNet
    from ..synth import split_lesions

    if recipe.workers < 0 or (recipe.workers and "fork" not in multiprocessing.get_all_start_methods()):
        raise InputError("--workers needs a number ≥ 0, and forked processes (Linux, macOS)")
    state = recipe.state or recipe.output.with_suffix(".state")
    cache = recipe.teacher_cache or state.parent / f"{state.stem}.teacher"
    initial = MeshNet.load(recipe.init) if recipe.init else None          # checked before the teacher's minutes
    if initial is not None and initial.spec.layers[0].out_channels != config.channels:
        raise InputError(f"{recipe.init.name} is a MeshNet-{initial.spec.layers[0].out_channels}, "
                         f"not --channels {config.channels}")
    teacher = Segmenter(recipe.teacher, device=config.device, precision="fp32")
    views = []
    for image in recipe.images:
        progress(f"teacher {recipe.teacher} on {image.name} (computed once, then read from {cache})", flush=True)
        views.append(distill_samples.teacher_view(teacher, load_volume(image), cache))
    size = recipe.crop or 96
    lesions: list[Path] = []
    if recipe.lesions:
        lesions = split_lesions(sorted(recipe.lesions.glob("*.nii*")))[0]
        if not lesions:
            raise InputError(f"no lesion masks (*.nii, *.nii.gz) in {recipe.lesions}")
    renderings = (_renderings(recipe, teacher, load_volume(recipe.images[0]), lesions, cache, config.device, progress)
                  if recipe.label_head else [])
    settings = distill_run.DistillConfig(train=config, steps=recipe.steps, temperature=recipe.temperature,
                                         weight=recipe.distill_weight, save_every=recipe.save_every,
                                         initial=sha256_of(recipe.init) if recipe.init else "", gamma=recipe.gamma,
                                         bias=recipe.bias_field)
    model, record = distill_run.distill(
        lambda step: distill_samples.crop_sample(views, step, recipe.seed, size, lesions, renderings, recipe.gamma,
                                                 recipe.bias_field), settings, state,
        [view.x[view.box] for view in views], progress=lambda text: progress(text, flush=True),
        stop_after=recipe.session_steps, conventions=teacher.spec, initial=initial, workers=recipe.workers)
    steps = len(record.losses)
    if steps < recipe.steps:
        progress(f"stopped at step {steps} of {recipe.steps}; the same command continues from {state}")
        if not recipe.unfinished:
            return None
    model.save(recipe.output, {"meshnet_distillation": json.dumps({
        "teacher": recipe.teacher, "channels": config.channels, "steps": steps, "crop": size,
        "temperature": recipe.temperature,
        **({"unfinished": f"step {steps} of {recipe.steps}"} if steps < recipe.steps else {}),
        "weight": recipe.distill_weight, "gamma": recipe.gamma, "bias_field": recipe.bias_field,
        "images": [str(p) for p in recipe.images], "painted_lesions": len(lesions),
        "renderings": len(renderings), "initial": _initial_run(recipe.init),
        "seconds": round(record.seconds, 1), "sessions": record.sessions,
        "losses_every_10": record.losses[::10]})})
    return recipe.output


def _renderings(recipe: Recipe, teacher, first, lesions: list[Path], cache: Path, device: str,
                progress: Callable[..., None]) -> list:
    """``renderings`` views of the label head: seeds [13, i] (the quality suite renders with 7, 8 and 9), even i
    lesion-free, odd i with training-split lesions, every other pair with the contrast of ``first`` (the first
    training image) on the teacher's grid."""
    from .. import synth

    head = synth.build_label_head(recipe.label_head, Registry(), device)
    prepared = teacher.model_input(first)
    contrast = None if prepared.brain is None else synth.measured_contrast(prepared.grid.array, prepared.brain)
    views = []
    for index in range(recipe.renderings):
        kind = "lesion-free" if index % 2 == 0 else "with lesions"
        measured = contrast if (index // 2) % 2 else None
        progress(f"rendering {index + 1}/{recipe.renderings} of {recipe.label_head.name} ({kind}, "
                 f"{'measured' if measured is not None else 'random'} contrast; computed once, then read from {cache})",
                 flush=True)
        views.append(distill_samples.rendered_view(teacher, head, [13, index], lesions if index % 2 else [], measured,
                                                   cache))
    return views


def _initial_run(path: Path | None) -> dict | None:
    """The training record of the student a fine-tuning run starts from (its file's name, SHA-256 and run)."""
    if path is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        run = handle.metadata().get("meshnet_distillation")
    return {"file": path.name, "sha256": sha256_of(path), "run": json.loads(run) if run else None}
