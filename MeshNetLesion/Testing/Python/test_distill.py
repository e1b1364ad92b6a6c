"""Distillation: the mixed loss against hand-computed values, the teacher cache, resuming from a state file,
and a short run on a real scan's crop with a real teacher that lowers the loss."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from meshnet_lesion.train.dataset import IGNORE
from meshnet_lesion.train.distill import (
    DistillConfig,
    TeacherCache,
    TeacherView,
    crop_sample,
    distill,
    distillation_loss,
    flips,
    intensity_augmented,
    measure_batchnorm,
    rendered_view,
    rendering_draws,
    student,
    teacher_logit,
)
from meshnet_lesion.train.training import TrainConfig


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


_TINY_WHOLE = [np.random.default_rng(99).random((16, 16, 16), dtype=np.float32)]


def test_batchnorm_runs_with_the_statistics_of_whole_volumes(tmp_path):
    """Once measured, eval mode on a whole volume gives what train mode (its own statistics) gives; a
    run measures them once, before its first step, and its steps leave them alone."""
    torch.manual_seed(0)
    model = student(4)
    volume = torch.from_numpy(_TINY_WHOLE[0])[None, None]
    measure_batchnorm(model, _TINY_WHOLE, mixed_precision=False)
    assert not model.training
    with torch.no_grad():
        in_eval = model(volume)
        model.train()
        in_train = model(volume)       # batch statistics of the same volume
    assert torch.allclose(in_eval, in_train, atol=5e-3)   # running_var is unbiased: n/(n − 1), 9 layers deep

    def statistics(model):
        return [t for name, t in model.state_dict().items() if "running" in name]

    config = DistillConfig(train=TrainConfig(channels=4, lr=1e-2, mixed_precision=False), steps=3, save_every=3)
    trained, _ = distill(_tiny_samples, config, tmp_path / "run.state", _TINY_WHOLE)
    torch.manual_seed(config.train.seed)
    initial = student(4)                              # the run's step-0 weights, and their statistics
    measure_batchnorm(initial, _TINY_WHOLE, mixed_precision=False)
    assert all(torch.equal(a, b) for a, b in zip(statistics(initial), statistics(trained)))
    assert not all(torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters()))


def test_a_run_continued_from_its_state_makes_the_same_weights(tmp_path):
    config = DistillConfig(train=TrainConfig(channels=3, lr=1e-2, device="cpu"), steps=6, save_every=2)
    whole, _ = distill(_tiny_samples, config, tmp_path / "whole.state", _TINY_WHOLE)
    first, record = distill(_tiny_samples, config, tmp_path / "parts.state", _TINY_WHOLE, stop_after=3)
    assert len(record.losses) == 3 and (tmp_path / "parts.state").is_file()
    resumed, record = distill(_tiny_samples, config, tmp_path / "parts.state", _TINY_WHOLE)
    assert len(record.losses) == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another run"):
        distill(_tiny_samples, replace(config, temperature=4.0), tmp_path / "parts.state", _TINY_WHOLE)


def test_samples_prepared_by_workers_make_the_same_weights(tmp_path):
    """``workers`` forked processes prepare the same samples, in the same order, as the step makes alone."""
    config = DistillConfig(train=TrainConfig(channels=3, lr=1e-2, device="cpu"), steps=5, save_every=5)
    alone, _ = distill(_tiny_samples, config, tmp_path / "alone.state", _TINY_WHOLE)
    helped, record = distill(_tiny_samples, config, tmp_path / "helped.state", _TINY_WHOLE, workers=2)
    assert len(record.losses) == 5
    for (name, a), b in zip(alone.state_dict().items(), helped.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_state_saved_before_a_setting_existed_continues_with_its_old_value(tmp_path):
    """A run saved before ``gamma`` was a setting ran with 0.3: its state continues under that value only."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from meshnet_lesion.train.distill import ADDED_SETTINGS, STATE_METADATA_KEY

    config = DistillConfig(train=TrainConfig(channels=3, lr=1e-2, mixed_precision=False), steps=4, save_every=2)
    path = tmp_path / "old.state"
    distill(_tiny_samples, config, path, _TINY_WHOLE, stop_after=2)
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[STATE_METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name in ADDED_SETTINGS:
        del metadata["config"][name]
    save_file(tensors, str(path), {STATE_METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(ValueError, match="another run"):
        distill(_tiny_samples, replace(config, gamma=0.5), path, _TINY_WHOLE)
    _, record = distill(_tiny_samples, config, path, _TINY_WHOLE)
    assert len(record.losses) == 4


def test_a_fine_tuning_run_starts_from_its_student_and_keeps_its_batchnorm_statistics(tmp_path):
    """``initial``: the run's first step starts from the given student's weights and statistics (never
    measured again: its layers were trained around them); the configuration names the weights."""
    config = DistillConfig(train=TrainConfig(channels=3, lr=1e-2, mixed_precision=False), steps=4, save_every=4)
    first, _ = distill(_tiny_samples, config, tmp_path / "first.state", _TINY_WHOLE)
    with pytest.raises(ValueError, match="SHA-256"):
        distill(_tiny_samples, config, tmp_path / "tuned.state", _TINY_WHOLE, initial=first)
    tuning = replace(config, steps=1, initial="0" * 64, train=replace(config.train, lr=1e-9))
    tuned, record = distill(_tiny_samples, tuning, tmp_path / "tuned.state", [_TINY_WHOLE[0] * 5], initial=first)
    assert len(record.losses) == 1
    for (name, a), b in zip(first.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name        # statistics kept; lr 1e-9 barely moves
    fresh, _ = distill(_tiny_samples, replace(tuning, initial=""), tmp_path / "fresh.state", _TINY_WHOLE)
    assert not torch.allclose(fresh.layers[0].conv.weight, first.layers[0].conv.weight)


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
    _, record = distill(samples, config, tmp_path / "run.state", [crop])
    assert np.mean(record.losses[-8:]) < 0.7 * np.mean(record.losses[:8])


def test_painted_samples_carry_ground_truth_there_and_the_teacher_elsewhere(shared):
    """A third of the samples get a real SOOP lesion painted in: the ground truth is 1 there, 0 elsewhere and
    IGNORE over the view's own lesion; the teacher's target is raised to the painted lesion. Samples are
    the same for the same step, and the student's input stays in the normalised range."""
    from meshnet_lesion.preprocess import head_box
    from meshnet_lesion.train.synth import split_lesions

    i, j, k = np.ogrid[:256, :256, :256]
    radius = ((i - 128) / 70.0) ** 2 + ((j - 128) / 85.0) ** 2 + ((k - 128) / 70.0) ** 2
    brain = radius < 1
    x = np.where(brain, np.where(radius > 0.85, 0.9, 0.3 + 0.1 * np.sin(i / 6.0)), 0).astype(np.float32)
    own = ((i - 100) ** 2 + (j - 128) ** 2 + (k - 128) ** 2) < 8 ** 2
    soft = np.where(own, 0.9, 0.02 * brain).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -128
    view = TeacherView.of(x, soft, head_box(brain, 24), affine, brain)
    lesions = split_lesions(sorted((shared / "lesions" / "soop").glob("*.nii.gz")))[0][:40]
    painted = []
    for step in range(24):
        image, target_soft, truth = crop_sample([view], step, 0, 32, lesions)
        assert image.shape == target_soft.shape == (32, 32, 32) and 0 <= image.min() and image.max() <= 1
        if truth is not None:
            painted.append((target_soft, truth))
    assert 3 <= len(painted) <= 16                                    # about a third of 24
    assert all(set(np.unique(truth)) <= {0, 1, IGNORE} for _, truth in painted)
    lesion_voxels = np.concatenate([t[g == 1] for t, g in painted])
    assert len(lesion_voxels) > 100 and np.mean(lesion_voxels > 0.5) > 0.9
    again = crop_sample([view], 5, 0, 32, lesions)
    first = crop_sample([view], 5, 0, 32, lesions)
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(first, again))


@pytest.fixture
def tiny_teacher(tmp_path, monkeypatch):
    """A registry model without a brain mask (imported into a cache of this test's own), as a Segmenter."""
    from meshnet_lesion import Segmenter
    from meshnet_lesion.registry import Registry
    from meshnet_lesion.train.model import build_meshnet

    monkeypatch.setenv("MESHNET_LESION_CACHE", str(tmp_path / "cache"))   # its imports stay out of other tests
    folder = tmp_path / "teacher"
    folder.mkdir()
    torch.manual_seed(1)
    build_meshnet(3).eval().save(folder / "model.safetensors")
    Registry().import_folder(folder, "tiny-teacher", card={"postprocess": {"brain_mask": False}})
    return Segmenter("tiny-teacher", device="cpu", precision="fp32")


def test_a_rendering_is_the_teachers_input_with_its_own_truth_and_is_cached(shared, label_head, tiny_teacher,
                                                                           tmp_path, monkeypatch):
    """A label-head rendering with a real SOOP lesion, on the teacher's grid (RAS-ordered t1_crop becomes the
    conformed grid): the truth keeps the painted lesion's size and lies on its hyperintense voxels; the
    soft target is the truth; a second call reads the view back; samples of it carry the truth."""
    from meshnet_lesion.train import synth

    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ label_head.affine      # another orientation: conform must turn it
    head = replace(label_head, affine=flipped)
    lesions = synth.split_lesions(sorted((shared / "lesions" / "soop").glob("*.nii.gz")))[0][:50]
    view = rendered_view(tiny_teacher, head, [13, 1], lesions, None, tmp_path / "views")
    rng, chosen = rendering_draws([13, 1], lesions)
    _, mask, _ = synth.render(head, [synth.LesionSource.load(p) for p in chosen], rng)
    painted = int(np.count_nonzero(mask == 1))
    assert painted > 200 and abs(int(view.truth.sum()) - painted) < 0.05 * painted
    assert np.array_equal(view.soft, view.truth.astype(np.float32))
    inside = view.brain & (view.truth == 0)
    assert view.x[view.truth == 1].mean() > np.percentile(view.x[inside], 60)      # T2: lesions are bright
    monkeypatch.setattr(synth, "render", lambda *a, **k: pytest.fail("rendered again"))
    again = rendered_view(tiny_teacher, head, [13, 1], lesions, None, tmp_path / "views")
    assert np.array_equal(again.x, view.x) and np.array_equal(again.truth, view.truth) and again.box == view.box
    free = TeacherView(view.x, np.zeros_like(view.soft), view.box, view.brain, view.stripped,
                       truth=np.zeros_like(view.truth))
    scan = TeacherView(view.x, np.full_like(view.soft, 0.5), view.box)
    seen = {"scan": 0, "lesion": 0, "free": 0}
    for step in range(16):
        image, soft, target = crop_sample([scan], step, 0, 32, renderings=[view, free])
        if target is None:
            seen["scan"] += 1
            assert np.allclose(soft[image > 0], 0.5, atol=0.01)
        else:                             # turned crops interpolate the soft target, the truth is nearest
            assert np.mean((soft > 0.5) == (target == 1)) > 0.98 and set(np.unique(target)) <= {0, 1}
            seen["lesion" if target.any() else "free"] += 1
            assert target.any() or soft.max() < 0.5
    assert min(seen.values()) >= 2, seen


def test_train_with_a_teacher_stops_resumes_and_writes_an_importable_student(tiny_teacher, tmp_path, capsys):
    """The command line: ``train IMAGE --teacher ID`` stops after --session-steps with its state saved, the
    same command finishes the run (here with --workers), and the student it writes records its run and
    imports as a model."""

    import nibabel as nib
    from safetensors import safe_open

    from meshnet_lesion import cli
    from meshnet_lesion.registry import Registry, sha256_of

    image = tmp_path / "head.nii.gz"
    volume = np.zeros((48, 48, 48), np.float32)
    volume[8:40, 8:40, 8:40] = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32) * 100
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image)
    output = tmp_path / "student.safetensors"
    command = ["train", str(image), "-o", str(output), "--teacher", "tiny-teacher", "--channels", "3",
               "--steps", "4", "--crop", "16", "--save-every", "1", "--session-steps", "2"]
    assert cli.main([*command, "--workers", "-1"]) == 2 and "--workers needs" in capsys.readouterr().err
    assert cli.main(command) == 0
    assert "stopped at step 2 of 4" in capsys.readouterr().out and not output.exists()
    assert (tmp_path / "student.state").is_file() and list((tmp_path / "student.teacher").glob("*.npz"))
    saved = sha256_of(tmp_path / "student.state")          # --unfinished --session-steps 0: the student so far
    assert cli.main([*command[:-1], "0", "--unfinished"]) == 0 and "(unfinished)" in capsys.readouterr().out
    with safe_open(str(output), framework="numpy") as handle:
        halfway = json.loads(handle.metadata()["meshnet_distillation"])
    assert halfway["unfinished"] == "step 2 of 4" and halfway["steps"] == 2 and len(halfway["sessions"]) == 1
    assert sha256_of(tmp_path / "student.state") == saved     # exporting trains nothing and leaves the state
    assert cli.main([*command, "--workers", "2"]) == 0          # the rest with its samples made by two workers
    with safe_open(str(output), framework="numpy") as handle:
        run = json.loads(handle.metadata()["meshnet_distillation"])
    assert run["teacher"] == "tiny-teacher" and run["channels"] == 3 and run["steps"] == 4 and "unfinished" not in run
    assert [(s["first_step"], s["steps"]) for s in run["sessions"]] == [(0, 2), (2, 2)]
    assert all("CPUs" in s["machine"] for s in run["sessions"])
    tuned = tmp_path / "tuned.safetensors"                         # --init: a fine-tuning run records its start
    fine_tune = ["train", str(image), "-o", str(tuned), "--teacher", "tiny-teacher", "--steps", "2", "--crop", "16",
                 "--init", str(output)]
    assert cli.main([*fine_tune, "--channels", "4"]) != 0 and not tuned.exists()   # not a MeshNet-4
    assert "is a MeshNet-3, not --channels 4" in capsys.readouterr().err
    assert cli.main([*fine_tune, "--channels", "3"]) == 0
    with safe_open(str(tuned), framework="numpy") as handle:
        initial = json.loads(handle.metadata()["meshnet_distillation"])["initial"]
    assert initial["file"] == output.name and initial["sha256"] == sha256_of(output) and initial["run"] == run
    folder = tmp_path / "student"
    folder.mkdir()
    output.rename(folder / output.name)
    assert Registry().import_folder(folder, "tiny-student").id == "tiny-student"


def test_a_tiled_students_tiles_are_its_training_crop(registry):
    """A shipped student that runs on tiles (its card's ``inference.tile``) runs on the crop its weights were
    distilled on, as their own metadata records it."""
    from safetensors import safe_open

    tiled = [e for e in registry.entries() if "distillation" in e.card and e.runtime.tile is not None]
    assert tiled, "no shipped student runs on tiles"
    for entry in tiled:
        path = entry.files[0].bundled
        with safe_open(str(path), framework="numpy") as handle:
            run = json.loads(handle.metadata()["meshnet_distillation"])
        first = (run.get("initial") or {}).get("run") or run
        assert entry.runtime.tile == first["crop"] == entry.card["distillation"]["crop"]


# Each shipped student's least Dice against its teacher on M2265. MeshNet-5: its bar, 0.75 (the suite measured
# 0.765 after its fine-tuning with renderings, quality-students.json); MeshNet-16 (96³ crops, on 96³ tiles): 0.86,
# the suite's 0.878 (quality-students.json, fp32) less a margin for bf16 rounding and the machine (its bar: 0.85).
SHIPPED = {"meshnet5-arc26": 0.75, "meshnet16-arc26": 0.86}


@pytest.mark.quality
@pytest.mark.parametrize(("student_id", "least"), SHIPPED.items())
def test_a_shipped_student_finds_its_teachers_lesion_on_m2265(registry, arc_volume, arc_result, student_id, least):
    """A bundled student, run as users run it, against its teacher (the default model) on the real ARC scan."""
    from meshnet_lesion import Segmenter
    from meshnet_lesion.train.metrics import dice

    entry = registry.get(student_id)
    assert entry.card["distillation"]["teacher"] == arc_result.model_id
    assert all(f.bundled is not None for f in entry.files)        # ships with the extension: no download
    result = Segmenter(student_id, registry=registry, device="cpu").segment(arc_volume)
    assert dice(result.labels == 1, arc_result.labels == 1) >= least


@pytest.mark.quality
@pytest.mark.parametrize("student_id", SHIPPED)
def test_a_shipped_student_finds_no_lesion_on_the_mirrored_healthy_hemisphere(registry, arc_volume, student_id):
    """M2265 with its lesioned hemisphere replaced by the mirrored healthy one: the issue's bar, at most 1 mL."""
    from meshnet_lesion import Segmenter
    from meshnet_lesion.train import perturb

    healthy = perturb.mirrored_healthy_hemisphere(arc_volume, "L")
    result = Segmenter(student_id, registry=registry, device="cpu").segment(healthy)
    assert result.lesion_volume_ml <= 1.0, f"{result.lesion_volume_ml:.2f} mL found on a lesion-free scan"


@pytest.mark.quality
def test_the_tiled_student_keeps_its_lesion_when_the_brain_mask_moves(registry, arc_volume):
    """Gamma 0.7 moves the edge of M2265's brain mask, and so the box the network runs on, by a voxel: tiles
    laid from the box's corner lost 1 % of the lesion (Dice 0.988), tiles on the grid's lattice keep it
    (0.998 in the suite; the teacher 0.997)."""
    from meshnet_lesion import Segmenter
    from meshnet_lesion.train import perturb
    from meshnet_lesion.train.metrics import dice

    segmenter = Segmenter("meshnet16-arc26", registry=registry, device="cpu")
    assert segmenter.tile == 96
    original = segmenter.segment(arc_volume).labels == 1
    shifted = segmenter.segment(perturb.gamma(arc_volume, 0.7)).labels == 1
    assert dice(shifted, original) >= 0.995
