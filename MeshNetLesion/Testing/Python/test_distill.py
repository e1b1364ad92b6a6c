"""Distillation: the mixed loss against hand-computed values, the teacher cache, resuming from a state file,
and a short run on a real scan's crop with a real teacher that lowers the loss."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from meshnet_lesion.dataset import IGNORE
from meshnet_lesion.distill import (
    DistillConfig,
    TeacherCache,
    distill,
    distillation_loss,
    flips,
    intensity_augmented,
    teacher_logit,
)
from meshnet_lesion.training import TrainConfig


def _by_hand(student, teacher_p, target, t, weight, background_weight, smoothing):
    """The loss for voxels given as lists, written out with math (no torch)."""
    kls, ce_num, ce_den = [], 0.0, 0.0
    for (l0, l1), p, y in zip(student, teacher_p, target):
        margin = math.log(p / (1 - p)) / t
        q1 = 1 / (1 + math.exp(-margin))
        teacher = [1 - q1, q1]
        z = [l0 / t, l1 / t]
        log_norm = math.log(math.exp(z[0]) + math.exp(z[1]))
        log_s = [z[0] - log_norm, z[1] - log_norm]
        kls.append(sum(teacher[c] * (math.log(teacher[c]) - log_s[c]) for c in range(2)))
        if y != IGNORE:
            log_p = [l0 - math.log(math.exp(l0) + math.exp(l1)), l1 - math.log(math.exp(l0) + math.exp(l1))]
            w = [background_weight, 1.0]
            # PyTorch's weighted, smoothed cross-entropy: (1-ε)·w_y·(−log p_y) + ε/C·Σ_c w_c·(−log p_c),
            # averaged by Σ w_y over the voxels that count
            ce_num += (1 - smoothing) * w[y] * -log_p[y] + smoothing / 2 * sum(w[c] * -log_p[c] for c in range(2))
            ce_den += w[y]
    kl = sum(kls) / len(kls) * t * t
    return weight * kl + (1 - weight) * ce_num / ce_den, kl


def test_the_loss_is_the_hand_computed_mix_of_teacher_and_ground_truth():
    student = [(0.3, -1.2), (-0.5, 2.0), (1.5, 0.1)]
    teacher_p = [0.2, 0.9, 0.6]
    target = [0, 1, IGNORE]
    config = DistillConfig(train=TrainConfig(background_weight=0.5, label_smoothing=0.01), temperature=2.0, weight=0.7)
    logits = torch.tensor(student).T[None]                       # (1, 2, 3)
    got = distillation_loss(logits, torch.tensor([teacher_p]), torch.tensor([target]), config)
    expected, kl = _by_hand(student, teacher_p, target, 2.0, 0.7, 0.5, 0.01)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    teacher_only = distillation_loss(logits, torch.tensor([teacher_p]), None, config)
    assert float(teacher_only) == pytest.approx(kl, rel=1e-5)


def test_the_teacher_term_is_zero_when_the_student_matches_the_teacher():
    p = torch.tensor([[0.1, 0.5, 0.95]])
    margin = teacher_logit(p)
    logits = torch.stack((torch.zeros_like(margin), margin), dim=1)
    assert float(distillation_loss(logits, p, None, DistillConfig(temperature=3.0))) == pytest.approx(0, abs=1e-6)
    assert torch.allclose(torch.sigmoid(margin), p, atol=1e-6)


def test_the_teacher_cache_computes_each_volume_once(tmp_path):
    calls = []

    def teacher(volume):
        calls.append(volume.shape)
        return (volume > 0.5).astype(np.float32) * 0.9

    volume = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    cache = TeacherCache(tmp_path, "arc-meshnet26", {"r0.pt": "ab"}, teacher)
    first = cache.probability(volume)
    again = TeacherCache(tmp_path, "arc-meshnet26", {"r0.pt": "ab"}, teacher).probability(volume)
    assert len(calls) == 1 and np.allclose(first, again, atol=1e-3)            # float16 on disk
    stored = list(tmp_path.glob("*.npz"))
    assert len(stored) == 1
    with np.load(stored[0], allow_pickle=False) as data:
        assert data["probability"].dtype == np.float16
    TeacherCache(tmp_path, "arc-meshnet26", {"r0.pt": "changed"}, teacher).probability(volume)
    cache.probability(volume[::-1])
    assert len(calls) == 3                                   # another teacher, another volume: computed again


def _tiny_samples(step):
    rng = np.random.default_rng(step)
    image = rng.random((12, 12, 12), dtype=np.float32)
    teacher = (image > 0.7).astype(np.float32) * 0.8 + 0.1
    return np.flip(image, flips(step)).copy(), np.flip(teacher, flips(step)).copy(), None


def test_a_run_continued_from_its_state_makes_the_same_weights(tmp_path):
    config = DistillConfig(train=TrainConfig(channels=3, lr=1e-2), steps=6, save_every=2)
    whole, _ = distill(_tiny_samples, config, tmp_path / "whole.state")
    first, record = distill(_tiny_samples, config, tmp_path / "parts.state", stop_after=3)
    assert len(record.losses) == 3 and (tmp_path / "parts.state").is_file()
    resumed, record = distill(_tiny_samples, config, tmp_path / "parts.state")
    assert len(record.losses) == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another run"):
        distill(_tiny_samples, replace(config, temperature=4.0), tmp_path / "parts.state")


def test_a_short_run_on_a_real_crop_with_a_real_teacher_lowers_the_loss(registry, arc_volume, tmp_path):
    from meshnet_lesion.engine import Engine
    from meshnet_lesion.preprocess import normalize

    teacher = Engine(registry.load("t2lesion-meshnet11"), "cpu", "fp32")
    spec = teacher.spec
    crop = normalize(arc_volume.array.astype(np.float32), spec.normalization)[150:174, 90:130, 100:140]
    cache = TeacherCache(tmp_path / "teacher", "t2lesion-meshnet11", {},
                         lambda v: teacher.run(v, probability_classes=[1]).probabilities[0])
    soft = cache.probability(np.ascontiguousarray(crop))
    assert 0.01 < soft.mean() < 0.99                                           # the crop holds lesion and tissue

    def samples(step):
        rng = np.random.default_rng(step)
        axes = flips(step)
        return (np.flip(intensity_augmented(crop, rng), axes).copy(), np.flip(soft, axes).copy(), None)

    config = DistillConfig(train=TrainConfig(channels=5, lr=1e-2), steps=40, save_every=20)
    _, record = distill(samples, config, tmp_path / "run.state")
    assert np.mean(record.losses[-8:]) < 0.7 * np.mean(record.losses[:8])
