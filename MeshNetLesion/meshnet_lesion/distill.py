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

BatchNorm is trained with fixed statistics. MeshNet's BatchNorm was fitted on whole 256³ volumes
(batch size 1), and at inference it applies those statistics; a student trained on 64³ crops in
PyTorch's train mode normalises each crop by its own statistics and learns to rely on that (one such
run matched its teacher on crops and called 919 mL of "lesion" on the whole scan in eval mode). Here
the statistics are measured once, before the first step, on the whole brain box of the training
volumes (what the network is run on; "precise BatchNorm"), and stay fixed: the layers learn around
them in eval mode, so the student trains with exactly the normalisation it is run with. Measuring
them again every 50 steps made the loss jump after each measurement and end higher than keeping them
(MeshNet-5 on M2265 crops, mean loss of steps 100-120: 0.80 against 0.52 at lr 2e-3, 0.93 against 0.50
at lr 5e-4).

A run writes its whole state (weights, optimiser and scheduler, the step, the record) to one
safetensors file every ``save_every`` steps and at the end; the samples of step ``s`` depend only on
the seed and ``s``, so a run continued from its state makes the same steps as one that never stopped.
No pickle is involved: tensors in safetensors, everything else as JSON in its metadata.

A run trains on its configured device (``auto``: a CUDA GPU where there is one) and keeps its state on
the CPU, so a run started on one machine continues on another. On a GPU the step outruns one core's
augmentation (1.7 s a 128³ sample on an EPYC core); ``workers`` forked processes then prepare the
samples ahead of it, the same samples in the same order.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import perturb, synth
from .dataset import IGNORE
from .devices import resolve_device
from .machine import describe, machine
from .model import MeshNet, build_meshnet
from .outputs import atomic_file
from .spec import ModelSpec
from .training import TrainConfig, autocast, make_optimizer, make_scheduler
from .volume import Volume

LOGIT_CLIP = 12.0
STATE_METADATA_KEY = "meshnet_distill_state"
GAMMA, BIAS_FIELD = 0.3, 0.15    # the student's intensity augmentation by default (intensity_augmented)


@dataclass
class DistillConfig:
    """The paper's recipe (``train``) plus the teacher's share of the loss and its temperature."""

    train: TrainConfig = field(default_factory=TrainConfig)
    steps: int = 1000
    temperature: float = 2.0
    weight: float = 0.7            # the teacher term's share where a ground truth exists (1 where none does)
    save_every: int = 50
    initial: str = ""              # SHA-256 of the weights a fine-tuning run starts from ("": a new student)
    gamma: float = GAMMA           # the student's intensities are raised to exp(±gamma) (intensity_augmented)
    bias: float = BIAS_FIELD       # and multiplied by a smooth field of 1 ± bias


# Settings added after runs were saved with the value they ran with: a state without one ran with this.
ADDED_SETTINGS = {"gamma": GAMMA, "bias": BIAS_FIELD}


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
    sessions: list[dict] = field(default_factory=list)       # each call's machine, first step, steps and seconds


def measure_batchnorm(model: MeshNet, volumes: Sequence[np.ndarray], mixed_precision: bool = True,
                      device: torch.device = torch.device("cpu")) -> None:
    """Set every BatchNorm layer's running mean and variance to the average of its statistics over
    ``volumes`` (each run whole, as inference runs it, on ``device``, where the model is); leaves the
    model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None                     # a cumulative average over the volumes
    model.train()
    with torch.no_grad(), _autocast(device, mixed_precision):
        for volume in volumes:
            model(torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None].to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def distill(samples: Callable[[int], Sample], config: DistillConfig, state_path: Path,
            statistics: Sequence[np.ndarray], progress: Callable[[str], None] | None = None,
            stop_after: int | None = None, conventions: ModelSpec | None = None,
            initial: MeshNet | None = None, workers: int = 0) -> tuple[MeshNet, Record]:
    """Train a student for ``config.steps`` steps, continuing from ``state_path`` if it exists.

    ``samples(step)`` gives step ``step``'s sample (it must depend only on the step, e.g. a generator
    seeded with it). ``statistics``: whole volumes (the teacher's view of each training volume, cut
    to its brain box) that BatchNorm's statistics are measured on, once, before the first step.
    ``stop_after``: return after this many steps of this call (a session's budget); the state is
    saved first, so the same call later continues where this one stopped. ``conventions``: the
    teacher's spec, whose input grid, normalisation and standardisation the student takes (it is
    trained on the teacher's view of each volume). ``initial``: a trained student to fine-tune (its
    SHA-256 in ``config.initial``); it keeps the BatchNorm statistics it was trained around, and
    ``statistics`` is not used. ``workers``: processes that prepare the samples ahead of the step
    (:func:`prepared_samples`; 0: each in turn, here).
    """
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    model = student(config.train.channels, conventions)
    if initial is not None:
        if not config.initial:
            raise ValueError("a fine-tuning run names its initial weights' SHA-256 in its configuration")
        model.load_state_dict(initial.state_dict())
    model.to(device)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, config.steps)
    step, record = 0, Record()
    if Path(state_path).is_file():
        step, record = load_state(state_path, model, optimizer, scheduler, config)
    info = machine()
    if device.type != "cuda":
        info.pop("gpu", None)                     # the machine's GPU, if any, did not train this session
    started, done_here = time.perf_counter(), 0
    session = {"machine": describe(info), "first_step": step, "steps": 0, "seconds": 0.0}
    last = config.steps if stop_after is None else min(config.steps, step + stop_after)
    if step < last:                                      # a call that trains nothing is no session
        record.sessions.append(session)
    with prepared_samples(samples, range(step, last), workers) as prepared:
        for image, teacher, target in prepared:
            if step == 0 and initial is None:
                measure_batchnorm(model, statistics, config.train.mixed_precision, device)
            model.eval()                          # BatchNorm applies its fixed statistics; weights still learn
            x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(device)
            soft = torch.from_numpy(np.ascontiguousarray(teacher, np.float32))[None].to(device)
            hard = None if target is None else \
                torch.from_numpy(np.ascontiguousarray(target, np.int64))[None].to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, config.train.mixed_precision):    # bf16 where the CPU has it: 2.5x at 96³
                logits = model(x)
            loss = distillation_loss(logits, soft, hard, config)
            loss.backward()
            optimizer.step()
            scheduler.step()
            record.losses.append(float(loss.detach()))
            step, done_here = step + 1, done_here + 1
            if step % config.save_every == 0 or step == config.steps:
                _account(record, session, started, done_here)
                started = time.perf_counter()
                save_state(state_path, model, optimizer, scheduler, step, record, config)
            if progress is not None and (step % 10 == 0 or step == config.steps):
                progress(f"step {step}/{config.steps}: loss {np.mean(record.losses[-10:]):.4f}")
    if done_here and step % config.save_every != 0 and step != config.steps:
        _account(record, session, started, done_here)
        save_state(state_path, model, optimizer, scheduler, step, record, config)
    return model.eval().cpu(), record


def _autocast(device: torch.device, enabled: bool):
    """bf16 where the device has it (a CPU as :func:`~.training.autocast` decides, a CUDA GPU that supports
    it), else fp32: fp16 would need a loss scaler, whose state a resumed run would have to carry too."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and torch.cuda.is_bf16_supported())
    return autocast(device, enabled)


_SAMPLES: Callable[[int], Sample] | None = None     # the run's samples, as the forked workers inherit them


def _sample_at(step: int) -> Sample:
    return _SAMPLES(step)


@contextmanager
def prepared_samples(samples: Callable[[int], Sample], steps: range, workers: int) -> Iterator[Iterator[Sample]]:
    """The samples of ``steps``, in order: made here one at a time (``workers`` 0), or by ``workers``
    forked processes, at most two each ahead of the step that uses them. A sample depends only on its
    step, so both give the same samples; forking hands the workers the volumes without copying or
    pickling them (it needs the fork start method: Linux, macOS)."""
    global _SAMPLES
    if workers <= 0 or not steps:
        yield (samples(step) for step in steps)
        return
    _SAMPLES = samples
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield _in_order(pool, steps, 2 * workers)
    finally:
        _SAMPLES = None


def _in_order(pool, steps: range, ahead: int) -> Iterator[Sample]:
    pending: deque = deque()
    for step in steps:
        pending.append(pool.apply_async(_sample_at, (step,)))
        if len(pending) > ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _account(record: Record, session: dict, started: float, done_here: int) -> None:
    elapsed = time.perf_counter() - started
    record.seconds += elapsed
    session["seconds"] = round(session["seconds"] + elapsed, 1)
    session["steps"] = done_here


def save_state(path: Path, model: MeshNet, optimizer: torch.optim.Optimizer, scheduler, step: int, record: Record,
               config: DistillConfig) -> Path:
    """Everything a run needs to continue, in one safetensors file (written atomically)."""
    from safetensors.torch import save_file

    tensors = {f"model.{name}": value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
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
    if {**ADDED_SETTINGS, **metadata["config"]} != _config_json(config):
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


def intensity_augmented(image: np.ndarray, rng: np.random.Generator, gamma: float = GAMMA,
                        bias: float = BIAS_FIELD) -> np.ndarray:
    """The student's view of a normalised [0, 1] volume: a gamma between exp(−``gamma``) and exp(``gamma``),
    scale, a smooth bias field (1 ± ``bias``) and noise, on the head (background stays 0). The teacher keeps
    the clean volume."""
    head = image > 0
    out = image.astype(np.float32, copy=True)
    out[head] = out[head] ** math.exp(rng.uniform(-gamma, gamma))
    coarse = rng.uniform(-bias, bias, (4, 4, 4)).astype(np.float32)
    field = ndimage.zoom(coarse, [n / 4 for n in image.shape], order=3)[tuple(slice(0, n) for n in image.shape)]
    out *= rng.uniform(0.9, 1.1) * (1 + field)
    out[head] += rng.normal(0, 0.02, int(head.sum())).astype(np.float32)
    out[~head] = 0
    return np.clip(out, 0, 1)


@dataclass
class TeacherView:
    """One training volume as the teacher sees it: its clean input on the model grid (normalised and
    standardised as the pipeline does) and the teacher's lesion probability there, 0 outside the brain;
    with the brain mask, a real head on that grid to paint lesions into (its own lesion left out)."""

    x: np.ndarray
    soft: np.ndarray
    box: tuple[slice, slice, slice]       # the box the lesion network sees (brain + margin): crops, statistics
    brain: np.ndarray | None = None
    stripped: np.ndarray | None = None    # what a skull-stripped scan keeps: the brain mask dilated 3 voxels
    head: synth.Head | None = None
    white: float = 0.0                    # painted lesions' rim and core intensities take these two
    csf: float = 0.0
    truth: np.ndarray | None = None       # a rendering's known lesion (0/1): its target everywhere, no teacher

    @classmethod
    def of(cls, x: np.ndarray, soft: np.ndarray, box: tuple[slice, slice, slice], affine: np.ndarray,
           brain: np.ndarray | None) -> TeacherView:
        if brain is None or not brain.any():
            return cls(x, soft, box)
        head = synth.real_head(Volume(x, affine), brain, soft > 0.5, "teacher-view")
        white = float(np.percentile(x[head.placeable], 30))    # as synth.render paints a real head
        csf = float(np.percentile(x[brain & ~head.ignore], 98))
        return cls(x, soft, box, brain, ndimage.binary_dilation(brain, iterations=3), head, white, csf)


def network_input(teacher, volume: Volume):
    """What ``teacher`` (a :class:`~.pipeline.Segmenter`) feeds its lesion network for ``volume``: the
    prepared input (grid, brain mask) and the normalised, standardised array."""
    from .preprocess import standardize

    prepared = teacher.model_input(volume)
    x = prepared.x
    if teacher.standardize and prepared.brain is not None:
        values = standardize(x, prepared.brain, teacher.spec.standardization)
        x = x if values is None else values
    return prepared, np.ascontiguousarray(x, np.float32)


def lesion_box(prepared) -> tuple[slice, slice, slice]:
    """The box the lesion network is run on: the brain and its margin, or the head without a brain mask."""
    from .pipeline import LESION_BRAIN_MARGIN
    from .preprocess import head_box

    if prepared.brain is not None and prepared.brain.any():
        return head_box(prepared.brain, LESION_BRAIN_MARGIN)
    return prepared.box


def _teacher_files(teacher) -> dict[str, str]:
    return {f.name: f.sha256 for member in teacher.registry.members(teacher.entry) for f in member.files}


def teacher_view(teacher, volume, cache_dir: Path) -> TeacherView:
    """The teacher's view of ``volume`` (a :class:`~.pipeline.Segmenter`), its probability cached on disk."""
    from .pipeline import cropped

    prepared, x = network_input(teacher, volume)
    box = prepared.box

    def run(volume_x: np.ndarray) -> np.ndarray:
        crop, surround = cropped(volume_x, box)
        probability = np.zeros(volume_x.shape, np.float32)
        probability[box] = np.mean([engine.run(crop, probability_classes=[1], surround=surround).probabilities[0]
                                    for engine in teacher.engines], axis=0)
        return probability

    soft = TeacherCache(cache_dir, teacher.entry.id, _teacher_files(teacher), run).probability(x)
    if prepared.brain is not None:
        soft = soft * prepared.brain
    return TeacherView.of(x, soft.astype(np.float32), lesion_box(prepared), prepared.grid.affine, prepared.brain)


def rendering_draws(seed: Sequence[int], lesions: Sequence[Path]) -> tuple[np.random.Generator, list[Path]]:
    """The lesions a rendering seeded with ``seed`` carries (one or two of ``lesions``; none if empty), and the
    generator that then renders it (:func:`~.synth.render`), as :func:`rendered_view` draws them."""
    rng = np.random.default_rng(list(seed))
    chosen = [lesions[i] for i in rng.choice(len(lesions), min(len(lesions), int(rng.integers(1, 3))),
                                             replace=False)] if lesions else []
    return rng, chosen


def rendered_view(teacher, head: synth.Head, seed: Sequence[int], lesions: Sequence[Path],
                  contrast: np.ndarray | None, cache_dir: Path) -> TeacherView:
    """A rendering of a label head (:func:`~.synth.render` seeded with ``seed``: lesion-free when ``lesions``
    is empty, else with one or two of them) as the student is trained on it: the teacher's input (its grid,
    brain mask and standardisation) and the rendering's own lesion as the target everywhere.

    The teacher's probability is not used here: the ARC-trained teachers call false lesions on such
    renderings (the quality suite's lesion-free cases), and a student that learnt them would too; a
    rendering's truth is known. The view is cached in ``cache_dir`` (the rendering and its brain mask take
    a minute)."""
    rng, chosen = rendering_draws(seed, lesions)
    drawn = head.tissues if head.tissues is not None else head.image
    anatomy = hashlib.sha256(np.ascontiguousarray(drawn).tobytes() + head.affine.tobytes()).hexdigest()
    identity = json.dumps({"teacher": teacher.entry.id, "files": _teacher_files(teacher), "head": anatomy,
                           "seed": list(seed), "lesions": [p.name for p in chosen],
                           "contrast": None if contrast is None else np.round(contrast, 6).tolist()}, sort_keys=True)
    path = Path(cache_dir) / f"rendering-{hashlib.sha256(identity.encode()).hexdigest()}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            x, truth, brain = (stored[k] for k in ("x", "truth", "brain"))
            box = tuple(slice(int(a), int(b)) for a, b in stored["box"])
    else:
        image, mask, _ = synth.render(head, [synth.LesionSource.load(p) for p in chosen], rng, contrast=contrast)
        volume = Volume(image, head.affine)
        prepared, x = network_input(teacher, volume)
        truth = perturb.onto(mask == 1, volume, Volume(prepared.grid.array, prepared.grid.affine)).astype(np.uint8)
        brain = prepared.brain if prepared.brain is not None else prepared.grid.array > 0
        box = lesion_box(prepared)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(handle, x=x, truth=truth, brain=brain, box=np.array([[b.start, b.stop] for b in box]))
    return TeacherView(x, truth.astype(np.float32), box, brain=brain,
                       stripped=ndimage.binary_dilation(brain, iterations=3), truth=truth)


# What a step's sample is made of (shares of the samples).
PAINTED = 1 / 3            # a training-split SOOP lesion painted in: ground truth there, the teacher elsewhere
LESION_CENTRED = 1 / 3     # a crop centred on the teacher's own lesion (the rest: anywhere in the brain box)
TURNED = 0.7               # rotated (±10°) and scaled (±10 %) about the crop's centre
SKULL_STRIPPED = 0.2       # everything outside the brain mask (dilated 3 voxels) set to 0
THICK_SLICES = 0.3         # blurred along one axis, or all three (2-4 mm slices, 2 mm voxels)
RENDERED = 0.5             # of a run given renderings: a crop of one of them (half of those on its lesion, if any)


def crop_sample(views: list[TeacherView], step: int, seed: int, size: int,
                lesions: Sequence[Path] = (), renderings: Sequence[TeacherView] = (), gamma: float = GAMMA,
                bias: float = BIAS_FIELD) -> Sample:
    """Step ``step``'s sample: a volume, maybe with a lesion from ``lesions`` painted in, a ``size``³ crop
    (maybe turned), flips; the student's input degraded as scans are (skull-stripped, thick slices,
    intensities, ``gamma`` and ``bias`` as in :func:`intensity_augmented`), the teacher's target from the
    clean volume. With ``renderings`` (:func:`rendered_view`), a share of the samples are crops of those,
    their truth the target. The shares are the constants above."""
    rng = np.random.default_rng([seed, step])
    view = views[int(rng.integers(len(views)))]
    if renderings and rng.random() < RENDERED:
        view = renderings[int(rng.integers(len(renderings)))]
    image, soft, target, centre = view.x, view.soft, view.truth, None
    kind = rng.random()
    if view.truth is not None:
        lesion = np.argwhere(view.truth == 1) if kind < 0.5 else np.empty((0, 3))
        if len(lesion):
            centre = lesion[int(rng.integers(len(lesion)))]
    elif kind < PAINTED and lesions and view.head is not None:
        painted = _painted(view, synth.LesionSource.load(lesions[int(rng.integers(len(lesions)))]), rng)
        if painted is not None:
            image, soft, target, centre = painted
    if centre is None:
        lesion = np.argwhere(view.soft > 0.5) if kind < PAINTED + LESION_CENTRED else np.empty((0, 3))
        centre = lesion[int(rng.integers(len(lesion)))] if len(lesion) else \
            np.array([int(rng.integers(b.start, b.stop)) for b in view.box])
    if rng.random() < SKULL_STRIPPED and view.stripped is not None:
        image = image * view.stripped
    arrays = [image, soft] + ([] if target is None else [target])
    arrays = _crop(arrays, centre, size, rng)
    if rng.random() < THICK_SLICES:
        if rng.random() < 0.5:
            arrays[0] = ndimage.gaussian_filter1d(arrays[0], rng.uniform(0.6, 1.5), axis=int(rng.integers(3)))
        else:
            arrays[0] = ndimage.gaussian_filter(arrays[0], rng.uniform(0.4, 0.8))
    arrays[0] = intensity_augmented(arrays[0], rng, gamma, bias)
    axes = flips(int(rng.integers(2 ** 31)))
    arrays = [np.flip(a, axes).copy() for a in arrays]
    return arrays[0], arrays[1], None if target is None else arrays[2]


def _painted(view: TeacherView, source: synth.LesionSource, rng: np.random.Generator):
    """The view with ``source`` painted in: (image, teacher target, ground truth, a lesion voxel), or None
    when it found no place. The teacher's target is its own map, raised to the painted lesion's fraction;
    the ground truth is 1 in the painted lesion, 0 elsewhere and IGNORE over the view's own lesion."""
    for _ in range(10):
        placed = synth.place_lesion(source, view.head, rng)
        if placed is not None:
            break
    else:
        return None
    fraction, box = placed
    image = view.x.copy()
    synth.paint_lesion(image, fraction, box, view.white, view.csf, rng)
    soft = view.soft.copy()
    soft[box] = np.maximum(soft[box], fraction)
    target = np.zeros(view.x.shape, np.uint8)
    target[box] = fraction > 0.5
    target[view.head.ignore & (target == 0)] = IGNORE
    inside = np.argwhere(fraction > 0.5)
    centre = inside[int(rng.integers(len(inside)))] + [b.start for b in box]
    return image, soft, target, centre


def _crop(arrays: list[np.ndarray], centre: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``size``³ crops about ``centre`` (kept inside the volume); some turned and scaled about it, images
    and maps resampled linearly, a ground truth (the third array) by nearest neighbour."""
    shape = np.array(arrays[0].shape)
    edge = np.minimum(size, shape)
    centre = np.clip(np.asarray(centre), edge // 2, shape - (edge - edge // 2))
    if rng.random() >= TURNED:
        region = tuple(slice(int(c - e // 2), int(c - e // 2 + e)) for c, e in zip(centre, edge))
        return [np.ascontiguousarray(a[region]) for a in arrays]
    linear = synth.random_rotation(rng, 10) * rng.uniform(0.9, 1.1, 3)
    offsets = np.indices(tuple(edge), np.float32).reshape(3, -1) - ((edge - 1) / 2)[:, None]
    points = linear.astype(np.float32) @ offsets + centre[:, None].astype(np.float32)
    return [ndimage.map_coordinates(a, points, order=0 if index == 2 else 1, mode="constant",
                                    cval=0).reshape(tuple(edge)).astype(a.dtype, copy=False)
            for index, a in enumerate(arrays)]
