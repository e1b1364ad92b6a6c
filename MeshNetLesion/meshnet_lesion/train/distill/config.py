"""A distillation run's configuration: the paper's recipe plus the teacher's share of the loss, its temperature, and
the student's intensity augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..training import TrainConfig
from .samples import BIAS_FIELD, GAMMA


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
