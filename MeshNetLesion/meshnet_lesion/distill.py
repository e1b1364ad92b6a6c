"""Knowledge distillation for small MeshNets: a teacher's soft targets, cached once per volume, and a
training run that resumes from a small state file.

Every voxel of a teacher's probability map is a training signal, not only the lesion voxels that a
sparse ground truth offers, which is the standard remedy when a small model trained on few steps
collapses to all-background. The loss mixes the two (Hinton et al. 2015):

    weight · T² · KL(teacher_T ‖ student_T)  +  (1 − weight) · CE(student, ground truth)

with both distributions softened by the temperature T (the T² keeps the gradient's scale), the
cross-entropy term the paper's (class weights, label smoothing) wherever a ground truth exists, and
the teacher term alone elsewhere. The teacher's two-class output is kept as its lesion probability;
its logit is recovered from it (clipped at ±:data:`LOGIT_CLIP`) to soften it at any temperature.

A run writes its whole state (weights, optimiser and scheduler, the step, the record) to one
safetensors file every ``save_every`` steps and at the end; the samples of step ``s`` depend only on
the seed and ``s``, so a run continued from its state makes the same steps as one that never stopped.
No pickle is involved: tensors in safetensors, everything else as JSON in its metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import IGNORE
from .model import MeshNet, build_meshnet
from .outputs import atomic_file
from .spec import ModelSpec
from .training import TrainConfig, autocast, make_optimizer, make_scheduler

LOGIT_CLIP = 12.0
STATE_METADATA_KEY = "meshnet_distill_state"


@dataclass
class DistillConfig:
    """The paper's recipe (``train``) plus the teacher's share of the loss and its temperature."""

    train: TrainConfig = field(default_factory=TrainConfig)
    steps: int = 1000
    temperature: float = 2.0
    weight: float = 0.7            # the teacher term's share where a ground truth exists (1 where none does)
    save_every: int = 50


def student(channels: int, conventions: ModelSpec | None = None) -> MeshNet:
    """The paper's MeshNet-``channels``, taking the input conventions (grid, normalisation, landmarks) of
    ``conventions`` (the teacher's spec): the same layers, only what the spec says about its input changes."""
    model = build_meshnet(channels)
    if conventions is not None:
        model.spec = replace(model.spec, input=conventions.input, normalization=conventions.normalization,
                             standardization=conventions.standardization)
    return model


def teacher_logit(probability: torch.Tensor) -> torch.Tensor:
    """The two-class logit margin (lesion − background) behind a lesion probability."""
    p = probability.float().clamp(1e-7, 1 - 1e-7)
    return (torch.log(p) - torch.log1p(-p)).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def distillation_loss(student_logits: torch.Tensor, teacher_probability: torch.Tensor,
                      target: torch.Tensor | None, config: DistillConfig) -> torch.Tensor:
    """The mixed loss for one batch: ``student_logits`` (N, 2, ...), ``teacher_probability`` (N, ...) of
    the lesion class, ``target`` (N, ...) with 0/1 and :data:`~.dataset.IGNORE`, or None (teacher only)."""
    t = config.temperature
    margin = teacher_logit(teacher_probability) / t
    teacher = torch.stack((torch.sigmoid(-margin), torch.sigmoid(margin)), dim=1)
    student = F.log_softmax(student_logits.float() / t, dim=1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - student)).sum(dim=1).mean() * t * t
    if target is None:
        return kl
    weight = torch.tensor([config.train.background_weight, 1.0], device=student_logits.device)
    ce = F.cross_entropy(student_logits.float(), target.long(), weight=weight, ignore_index=IGNORE,
                         label_smoothing=config.train.label_smoothing)
    return config.weight * kl + (1 - config.weight) * ce


class TeacherCache:
    """A teacher's lesion probabilities per input volume, computed once and kept on disk.

    Files are ``<key>.npz`` (``np.savez_compressed``, float16, read back with ``allow_pickle=False``);
    the key is the SHA-256 of the teacher's identity (id and weight files' hashes) and of the input
    array's bytes and shape, so a changed teacher or volume never meets a stale map.
    """

    def __init__(self, folder: Path, teacher_id: str, teacher_files: dict[str, str],
                 compute: Callable[[np.ndarray], np.ndarray]) -> None:
        self.folder = Path(folder)
        self.identity = json.dumps({"teacher": teacher_id, "files": teacher_files}, sort_keys=True)
        self.compute = compute
        self.computed = 0           # how many maps this cache had to compute (the rest came from disk)

    def key(self, volume: np.ndarray) -> str:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(str(volume.shape).encode())
        digest.update(np.ascontiguousarray(volume, np.float32).tobytes())
        return digest.hexdigest()

    def probability(self, volume: np.ndarray) -> np.ndarray:
        path = self.folder / f"{self.key(volume)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return stored["probability"].astype(np.float32)
        probability = np.asarray(self.compute(volume), np.float32)
        if probability.shape != volume.shape:
            raise ValueError(f"the teacher returned {probability.shape} for a {volume.shape} volume")
        self.computed += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(handle, probability=probability.astype(np.float16))
        return probability


Sample = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # student input, teacher probability, ground truth or None


@dataclass
class Record:
    losses: list[float] = field(default_factory=list)        # loss of every step
    seconds: float = 0.0


def distill(samples: Callable[[int], Sample], config: DistillConfig, state_path: Path,
            progress: Callable[[str], None] | None = None, stop_after: int | None = None,
            conventions: ModelSpec | None = None) -> tuple[MeshNet, Record]:
    """Train a student for ``config.steps`` steps, continuing from ``state_path`` if it exists.

    ``samples(step)`` gives step ``step``'s sample (it must depend only on the step, e.g. a generator
    seeded with it). ``stop_after``: return after this many steps of this call (a session's budget);
    the state is saved first, so the same call later continues where this one stopped.
    ``conventions``: the teacher's spec, whose input grid, normalisation and standardisation the
    student takes (it is trained on the teacher's view of each volume).
    """
    import time

    torch.manual_seed(config.train.seed)
    model = student(config.train.channels, conventions)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, config.steps)
    step, record = 0, Record()
    if Path(state_path).is_file():
        step, record = load_state(state_path, model, optimizer, scheduler, config)
    started, done_here, cpu = time.perf_counter(), 0, torch.device("cpu")
    while step < config.steps and (stop_after is None or done_here < stop_after):
        model.train()
        image, teacher, target = samples(step)
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
        soft = torch.from_numpy(np.ascontiguousarray(teacher, np.float32))[None]
        hard = None if target is None else torch.from_numpy(np.ascontiguousarray(target, np.int64))[None]
        optimizer.zero_grad(set_to_none=True)
        with autocast(cpu, config.train.mixed_precision):     # bf16 where the CPU has it: 2.5x at 96³
            logits = model(x)
        loss = distillation_loss(logits, soft, hard, config)
        loss.backward()
        optimizer.step()
        scheduler.step()
        record.losses.append(float(loss.detach()))
        step, done_here = step + 1, done_here + 1
        if step % config.save_every == 0 or step == config.steps:
            record.seconds += time.perf_counter() - started
            started = time.perf_counter()
            save_state(state_path, model, optimizer, scheduler, step, record, config)
        if progress is not None and (step % 10 == 0 or step == config.steps):
            progress(f"step {step}/{config.steps}: loss {np.mean(record.losses[-10:]):.4f}")
    if step % config.save_every != 0 and step != config.steps:
        record.seconds += time.perf_counter() - started
        save_state(state_path, model, optimizer, scheduler, step, record, config)
    return model.eval(), record


def save_state(path: Path, model: MeshNet, optimizer: torch.optim.Optimizer, scheduler, step: int, record: Record,
               config: DistillConfig) -> Path:
    """Everything a run needs to continue, in one safetensors file (written atomically)."""
    from safetensors.torch import save_file

    tensors = {f"model.{name}": value.detach().clone() for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).clone()
    metadata = {"step": step, "record": asdict(record), "config": _config_json(config),
                "optimizer_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict()}
    with atomic_file(Path(path)) as partial:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
                  metadata={STATE_METADATA_KEY: json.dumps(metadata)})
    return Path(path)


def load_state(path: Path, model: MeshNet, optimizer: torch.optim.Optimizer, scheduler,
               config: DistillConfig) -> tuple[int, Record]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[STATE_METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata["config"] != _config_json(config):
        raise ValueError(f"{path} is the state of another run (its configuration differs); use a new state file")
    model.load_state_dict({name[len("model."):]: value for name, value in tensors.items()
                           if name.startswith("model.")})
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": metadata["optimizer_groups"]})
    scheduler.load_state_dict(metadata["scheduler"])
    return int(metadata["step"]), Record(**metadata["record"])


def _config_json(config: DistillConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def flips(step_seed: int) -> tuple[int, ...]:
    """The axes a sample is flipped along for a step (each with probability ½), from the step's seed."""
    rng = np.random.default_rng(step_seed)
    return tuple(axis for axis in range(3) if rng.random() < 0.5)


def intensity_augmented(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The student's view of a normalised [0, 1] volume: gamma, scale, a smooth bias field and noise, on the
    head (background stays 0). The teacher keeps the clean volume."""
    head = image > 0
    out = image.astype(np.float32, copy=True)
    out[head] = out[head] ** math.exp(rng.uniform(-0.3, 0.3))
    coarse = rng.uniform(-0.15, 0.15, (4, 4, 4)).astype(np.float32)
    from scipy import ndimage

    field = ndimage.zoom(coarse, [n / 4 for n in image.shape], order=3)[tuple(slice(0, n) for n in image.shape)]
    out *= rng.uniform(0.9, 1.1) * (1 + field)
    out[head] += rng.normal(0, 0.02, int(head.sum())).astype(np.float32)
    out[~head] = 0
    return np.clip(out, 0, 1)


@dataclass
class TeacherView:
    """One training volume as the teacher sees it: its clean input on the model grid (normalised and
    standardised as the pipeline does) and the teacher's lesion probability there, 0 outside the brain."""

    x: np.ndarray
    soft: np.ndarray
    box: tuple[slice, slice, slice]       # the head box, where crops are drawn


def teacher_view(teacher, volume, cache_dir: Path) -> TeacherView:
    """The teacher's view of ``volume`` (a :class:`~.pipeline.Segmenter`), its probability cached on disk."""
    from .pipeline import cropped
    from .preprocess import standardize

    prepared = teacher.model_input(volume)
    x = prepared.x
    if teacher.standardize and prepared.brain is not None:
        values = standardize(x, prepared.brain, teacher.spec.standardization)
        x = x if values is None else values
    box = prepared.box

    def run(volume_x: np.ndarray) -> np.ndarray:
        crop, surround = cropped(volume_x, box)
        probability = np.zeros(volume_x.shape, np.float32)
        probability[box] = np.mean([engine.run(crop, probability_classes=[1], surround=surround).probabilities[0]
                                    for engine in teacher.engines], axis=0)
        return probability

    files = {f.name: f.sha256 for member in teacher.registry.members(teacher.entry) for f in member.files}
    soft = TeacherCache(cache_dir, teacher.entry.id, files, run).probability(np.ascontiguousarray(x, np.float32))
    if prepared.brain is not None:
        soft = soft * prepared.brain
    return TeacherView(np.asarray(x, np.float32), soft.astype(np.float32), box)


def crop_sample(views: list[TeacherView], step: int, seed: int, size: int) -> Sample:
    """Step ``step``'s sample: a volume, a ``size``³ crop inside its head box (half of them centred on the
    teacher's lesion), flips; the student's input intensity-augmented, the teacher's target clean."""
    rng = np.random.default_rng([seed, step])
    view = views[int(rng.integers(len(views)))]
    lesion = np.argwhere(view.soft > 0.5) if rng.random() < 0.5 else np.empty((0, 3))
    if len(lesion):
        centre = lesion[int(rng.integers(len(lesion)))]
    else:
        centre = np.array([int(rng.integers(b.start, b.stop)) for b in view.box])
    lo = [int(np.clip(c - size // 2, 0, n - min(size, n))) for c, n in zip(centre, view.x.shape)]
    region = tuple(slice(a, a + min(size, n)) for a, n in zip(lo, view.x.shape))
    axes = flips(int(rng.integers(2 ** 31)))
    image = intensity_augmented(view.x[region], rng)
    return np.flip(image, axes).copy(), np.flip(view.soft[region], axes).copy(), None
