"""The distillation loss: the teacher's soft targets mixed with the ground truth where there is one (Hinton et al.
2015; the package's text gives the formula)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dataset import IGNORE
from .config import DistillConfig

LOGIT_CLIP = 12.0


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
