"""Training MeshNet lesion models with the recipe of Fedorov et al. 2025 as the defaults.

Whole conformed volumes (or random crops on small machines), batch 1, AdamW (lr 1e-3, weight
decay 3e-5, eps 1e-4), OneCycleLR starting at lr/100 with 1 % warm-up then cosine annealing,
cross-entropy with label smoothing 0.01 and class weights 0.5 (background) / 1.0 (lesion), mixed
precision, 50 epochs, the best of several restarts by validation Dice.

Validation runs the trained weights through the same :class:`~.engine.Engine` the CLI and Slicer
use, so the score is the score of what ships. Checkpoints are our safetensors files (weights and
model spec; the training record in the metadata): ready for ``meshnet-lesion models import``.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .dataset import IGNORE
from .model import MeshNet, build_meshnet

TRAINING_METADATA_KEY = "meshnet_training"


@dataclass
class TrainConfig:
    channels: int = 16
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 3e-5
    eps: float = 1e-4
    warmup: float = 0.01            # fraction of all steps spent rising from lr / start_div to lr
    start_div: float = 100.0
    label_smoothing: float = 0.01
    background_weight: float = 0.5  # lesion weight is 1
    mixed_precision: bool = True    # fp16 + gradient scaling on CUDA, bf16 on a CPU that has it
    restarts: int = 1               # the paper: 10 for MeshNet; the best by validation Dice is kept
    seed: int = 0
    device: str = "auto"


@dataclass
class History:
    config: TrainConfig
    losses: list[float] = field(default_factory=list)        # mean training loss per epoch
    validation_dice: list[float] = field(default_factory=list)
    seconds: float = 0.0
    restart: int = 0


def make_loss(config: TrainConfig, device: torch.device | str = "cpu") -> nn.CrossEntropyLoss:
    weight = torch.tensor([config.background_weight, 1.0], device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing, ignore_index=IGNORE)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, eps=config.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(1, total_steps),
                                               pct_start=config.warmup, div_factor=config.start_div,
                                               anneal_strategy="cos")


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    from ..devices import cpu_has_native_bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cpu" and cpu_has_native_bf16())


Sample = tuple[np.ndarray, np.ndarray]    # normalised image (D, H, W) float32, lesion mask (D, H, W) {0, 1}


def validation_dice(model: MeshNet, samples: Sequence[Sample], device: str = "cpu") -> float:
    """Mean Dice of the model's lesion labels over ``samples``, computed with the inference engine."""
    from ..engine import Engine
    from .metrics import dice

    engine = Engine(model.to_loaded(), device, "fp32" if device == "cpu" else "auto")
    return float(np.mean([dice((engine.run(image).labels == 1) & (mask != IGNORE), mask == 1)
                          for image, mask in samples]))


def train(samples: Callable[[int], Iterable[Sample]], steps_per_epoch: int, config: TrainConfig,
          validation: Sequence[Sample] = (), progress: Callable[[str], None] | None = None,
          on_epoch: Callable[[int, History], None] | None = None) -> tuple[MeshNet, History]:
    """Train ``config.restarts`` MeshNets; return the best (by validation Dice, else by last loss).

    ``samples(epoch)`` yields the training samples of one epoch (``steps_per_epoch`` of them):
    whole volumes, random crops or synthetic renderings, as the caller decides. ``on_epoch(epoch,
    history)`` runs after each epoch's validation (a hyperparameter search reports there, and may
    raise to stop the run).
    """
    from ..devices import resolve_device

    device = resolve_device(config.device)
    rank, world, owns_group = _join_process_group(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    per_rank = steps_per_epoch // world if world > 1 else steps_per_epoch
    if per_rank < 1:
        raise ValueError(f"{steps_per_epoch} samples per epoch cannot be shared among {world} processes")
    best: tuple[float, MeshNet, History] | None = None
    for restart in range(config.restarts):
        torch.manual_seed(config.seed + restart)       # the same initial weights in every process
        model = build_meshnet(config.channels).to(device)
        net: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Batch 1 per process, BatchNorm statistics per volume as in the paper (no SyncBatchNorm).
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        history = History(config, restart=restart)
        loss_fn = make_loss(config, device)
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, config.epochs * per_rank)
        scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision and device.type == "cuda")
        started = time.perf_counter()
        for epoch in range(config.epochs):
            model.train()
            total, count = 0.0, 0
            # every process draws the same epoch and takes every world-th sample, the same count each
            for image, mask in itertools.islice(samples(epoch), rank, per_rank * world, world):
                x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(device)
                y = torch.from_numpy(np.ascontiguousarray(mask, np.int64))[None].to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, config.mixed_precision):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total, count = total + float(loss.detach()), count + 1
            history.losses.append(total / max(count, 1))
            if world > 1:
                _average_buffers(model)
            model.eval()
            if validation:
                history.validation_dice.append(validation_dice(model, validation, str(device)))
            if on_epoch is not None:
                on_epoch(epoch, history)
            if progress is not None and rank == 0:
                dice_text = f", validation Dice {history.validation_dice[-1]:.3f}" if validation else ""
                progress(f"restart {restart + 1}/{config.restarts} epoch {epoch + 1}/{config.epochs}: "
                         f"loss {history.losses[-1]:.4f}{dice_text}")
        history.seconds = time.perf_counter() - started
        score = history.validation_dice[-1] if validation else -history.losses[-1]
        if best is None or score > best[0]:
            best = (score, model, history)
    if owns_group:
        torch.distributed.destroy_process_group()
    return best[1].cpu().eval(), best[2]


def _average_buffers(model: nn.Module) -> None:
    """BatchNorm running statistics averaged over the processes, so every process holds the same model
    (DDP keeps the parameters equal; each process's statistics saw only its own volumes)."""
    import torch.distributed as dist

    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def _join_process_group(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the group) under ``torchrun``; (0, 1, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


# The paper's search space; epochs (15-50) are the fidelity that successive halving allocates.
SEARCH_SPACE = {"channels": (5, 21), "lr": (1e-4, 4e-2), "weight_decay": (1e-4, 4e-2),
                "background_weight": (0.0, 1.0), "warmup": (0.02, 0.1, 0.2), "epochs": (15, 50)}


def suggest_config(trial, base: TrainConfig, max_epochs: int) -> TrainConfig:
    """A configuration drawn from :data:`SEARCH_SPACE` by an Optuna trial."""
    space = SEARCH_SPACE
    return replace(base, channels=trial.suggest_int("channels", *space["channels"]),
                   lr=trial.suggest_float("lr", *space["lr"], log=True),
                   weight_decay=trial.suggest_float("weight_decay", *space["weight_decay"], log=True),
                   background_weight=trial.suggest_float("background_weight", *space["background_weight"]),
                   warmup=trial.suggest_categorical("warmup", list(space["warmup"])), epochs=max_epochs, restarts=1)


def tune(samples: Callable[[int], Iterable[Sample]], steps_per_epoch: int, validation: Sequence[Sample], trials: int,
         base: TrainConfig | None = None, min_epochs: int = 15, max_epochs: int = 50, storage: str | None = None,
         study_name: str = "meshnet-lesion", progress: Callable[[str], None] | None = None):
    """Hyperparameter search with Optuna: TPE sampling, asynchronous successive halving (ASHA) over epochs.

    Each trial trains up to ``max_epochs`` and reports validation Dice after every epoch; the pruner
    stops the worse trials at rungs from ``min_epochs`` on. With an RDB ``storage`` (e.g.
    ``sqlite:///study.db``) a search resumes, and several processes (one per GPU) can share it.
    """
    import optuna

    if not validation:
        raise ValueError("a hyperparameter search needs validation samples")
    base = base or TrainConfig()
    study = optuna.create_study(direction="maximize", study_name=study_name, storage=storage, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=base.seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs,
                                                                             reduction_factor=3))

    def objective(trial) -> float:
        config = suggest_config(trial, base, max_epochs)

        def report(epoch: int, history: History) -> None:
            trial.report(history.validation_dice[-1], epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()

        _, history = train(samples, steps_per_epoch, config, validation, progress, on_epoch=report)
        return history.validation_dice[-1]

    study.optimize(objective, n_trials=trials)
    return study


def save_checkpoint(model: MeshNet, path: str | Path, history: History | None = None) -> Path:
    """Write weights + spec (+ the training record) into one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = None if history is None else json.dumps({**asdict(history), "config": asdict(history.config)})
    model.save(path, None if record is None else {TRAINING_METADATA_KEY: record})
    return path


def read_training_record(path: str | Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(TRAINING_METADATA_KEY)
    return None if text is None else json.loads(text)
