"""A distillation run: its configuration, the student, precise BatchNorm statistics, the training loop, and the
state file it resumes from (weights, optimiser, scheduler, step and record in one safetensors file)."""
from __future__ import annotations

import json
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...devices import resolve_device
from ...machine import describe, machine
from ...outputs import atomic_file
from ...spec import ModelSpec
from ..model import MeshNet, build_meshnet
from ..training import autocast, make_optimizer, make_scheduler
from .config import ADDED_SETTINGS, DistillConfig
from .loss import distillation_loss
from .samples import Sample

STATE_METADATA_KEY = "meshnet_distill_state"


def student(channels: int, conventions: ModelSpec | None = None) -> MeshNet:
    """The paper's MeshNet-``channels``, taking the input conventions (grid, normalisation, landmarks) of
    ``conventions`` (the teacher's spec): the same layers, only what the spec says about its input changes."""
    model = build_meshnet(channels)
    if conventions is not None:
        model.spec = replace(model.spec, input=conventions.input, normalization=conventions.normalization,
                             standardization=conventions.standardization)
    return model


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
