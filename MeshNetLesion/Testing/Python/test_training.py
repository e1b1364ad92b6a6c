"""Training recipe and metrics: each checked against numbers worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meshnet_lesion.train.metrics import average_volume_difference, compare_models, dice, holm, matthews, volume_difference_ml
from meshnet_lesion.train.model import MeshNet
from meshnet_lesion.train.training import (
    TrainConfig,
    make_loss,
    make_optimizer,
    make_scheduler,
    read_training_record,
    save_checkpoint,
    train,
)


# ------------------------------------------------------------------ loss
def test_loss_uses_the_class_weights_and_label_smoothing_of_the_recipe():
    config = TrainConfig()
    assert (config.background_weight, config.label_smoothing) == (0.5, 0.01)
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-0.3, 0.2]])        # three voxels, two classes
    target = torch.tensor([0, 1, 1])
    nll = -torch.log_softmax(logits, dim=1)
    weights = torch.tensor([0.5, 1.0])
    eps = 0.01
    # PyTorch's definition: (1 − ε)·w_y·nll_y + ε/C·Σ_c w_c·nll_c, summed, divided by Σ w_y
    per_voxel = [(1 - eps) * weights[t] * nll[i, t] + eps / 2 * (weights * nll[i]).sum() for i, t in enumerate(target)]
    expected = sum(per_voxel) / weights[target].sum()
    assert make_loss(config)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)

    plain = make_loss(TrainConfig(label_smoothing=0.0))(logits, target).item()
    assert plain == pytest.approx(((0.5 * nll[0, 0] + nll[1, 1] + nll[2, 1]) / 2.5).item(), rel=1e-6)
    # voxels marked IGNORE (e.g. a real lesion under synthetic ones) do not count at all
    ignored = make_loss(config)(logits, torch.tensor([0, 255, 1])).item()
    assert ignored == pytest.approx(make_loss(config)(logits[[0, 2]], target[[0, 2]]).item(), rel=1e-6)


def test_optimizer_and_one_cycle_schedule_follow_the_recipe():
    config = TrainConfig()
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, config)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"]) == (1e-3, 3e-5, 1e-4)
    scheduler = make_scheduler(optimizer, config, total_steps=1000)
    rates = []
    for _ in range(1000):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-5)                       # starts at lr / 100
    peak = int(np.argmax(rates))
    assert peak == pytest.approx(10, abs=1) and rates[peak] == pytest.approx(1e-3)   # 1 % warm-up
    assert all(b <= a for a, b in zip(rates[peak:], rates[peak + 1:]))             # then anneals
    assert rates[-1] < 1e-6


# ------------------------------------------------------------------ metrics
def test_metrics_match_hand_computed_cases():
    truth = np.zeros(100, bool)
    truth[:10] = True                      # 10 lesion voxels
    prediction = np.zeros(100, bool)
    prediction[5:20] = True                # 15 predicted: TP 5, FP 10, FN 5, TN 80
    assert dice(prediction, truth) == pytest.approx(2 * 5 / (15 + 10))
    assert average_volume_difference(prediction, truth) == pytest.approx(0.5)
    assert volume_difference_ml(prediction, truth) == pytest.approx(0.005)
    assert matthews(prediction, truth) == pytest.approx((5 * 80 - 10 * 5) / math.sqrt(15 * 10 * 90 * 85))
    empty = np.zeros(100, bool)
    assert dice(empty, empty) == 1.0 and math.isnan(average_volume_difference(prediction, empty))
    assert matthews(truth, truth) == pytest.approx(1.0) and matthews(empty, truth) == 0.0


def test_holm_correction_and_paired_tests():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 30)
    rows = compare_models({"a": base, "b": base + 0.05 + rng.normal(0, 0.01, 30), "c": base})
    by_pair = {(r["a"], r["b"]): r for r in rows}
    assert by_pair[("a", "b")]["p_holm"] < 1e-4 and by_pair[("a", "b")]["median_difference"] < 0
    assert by_pair[("a", "c")]["p_holm"] == 1.0
    assert all(r["p_holm"] >= r["p"] for r in rows)


# ------------------------------------------------------------------ training
def _blobs(seed: int, size: int = 24):
    """Tiny T2-like volumes: a grey head with a bright (CSF-like) lesion blob."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32)
    centre = rng.uniform(8, size - 8, 3)
    radius = rng.uniform(3, 5)
    mask = (((grid - centre[:, None, None, None]) ** 2).sum(0) < radius ** 2).astype(np.uint8)
    image = 0.4 + 0.05 * rng.standard_normal((size,) * 3).astype(np.float32) + 0.5 * mask
    return np.clip(image, 0, 1).astype(np.float32), mask


def test_two_epochs_on_tiny_volumes_lower_the_loss_and_validate_with_the_engine():
    data = [_blobs(i) for i in range(6)]
    config = TrainConfig(channels=5, epochs=2, lr=1e-2, mixed_precision=False, device="cpu")
    model, history = train(lambda epoch: iter(data), steps_per_epoch=6, config=config, validation=[_blobs(99)])
    assert len(history.losses) == 2 and history.losses[1] < history.losses[0]
    assert len(history.validation_dice) == 2 and all(0.0 <= d <= 1.0 for d in history.validation_dice)
    assert isinstance(model, MeshNet) and not model.training


def test_hyperparameter_search_samples_the_paper_space_prunes_by_epochs_and_resumes(tmp_path):
    import optuna

    from meshnet_lesion.train.training import SEARCH_SPACE, tune

    data = [_blobs(i, size=16) for i in range(3)]
    base = TrainConfig(mixed_precision=False, device="cpu")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = tune(lambda epoch: iter(data), 3, [_blobs(98, size=16)], trials=4, base=base, min_epochs=1,
                 max_epochs=3, storage=storage)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert len(study.trials) == 4 and study.best_trial.state == optuna.trial.TrialState.COMPLETE
    for trial in study.trials:
        p = trial.params
        assert SEARCH_SPACE["channels"][0] <= p["channels"] <= SEARCH_SPACE["channels"][1]
        assert 1e-4 <= p["lr"] <= 4e-2 and 1e-4 <= p["weight_decay"] <= 4e-2
        assert 0 <= p["background_weight"] <= 1 and p["warmup"] in (0.02, 0.1, 0.2)
        assert list(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(len(t.intermediate_values) == 3 for t in complete)        # completed trials ran every epoch
    resumed = tune(lambda epoch: iter(data), 3, [_blobs(98, size=16)], trials=1, base=base, min_epochs=1,
                   max_epochs=3, storage=storage)
    assert len(resumed.trials) == 5


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = []

    def samples(epoch):
        for i in range(4):
            seen.append(i)
            yield _blobs(i, size=16)

    config = TrainConfig(channels=4, epochs=2, lr=1e-2, mixed_precision=False, device="cpu")
    model, history = train(samples, 4, config)
    torch.save({"state": model.state_dict(), "losses": history.losses}, f"{out}/rank{rank}.pt")


def test_distributed_training_keeps_every_process_in_step(tmp_path):
    """Two CPU processes (gloo), as torchrun starts them: same weights at the end, each saw its share."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    assert first["losses"] != second["losses"]           # different samples in each process


def test_a_checkpoint_reloads_bit_exactly(tmp_path):
    config = TrainConfig(channels=5, epochs=1, lr=1e-2, mixed_precision=False, device="cpu")
    model, history = train(lambda epoch: iter([_blobs(1), _blobs(2)]), steps_per_epoch=2, config=config)
    path = save_checkpoint(model, tmp_path / "meshnet5.safetensors", history)
    assert not list(tmp_path.glob(".*partial"))
    again = MeshNet.load(path)
    original = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    reloaded = again.state_dict()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    record = read_training_record(path)
    assert record["config"]["channels"] == 5 and record["losses"] == history.losses


# ------------------------------------------------------------------ command line
def _write_pairs(tmp_path, seeds):
    from meshnet_lesion import save_volume

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    rows = ["image,mask"]
    for seed in seeds:
        image, mask = _blobs(seed, size=40)
        save_volume(tmp_path / f"s{seed}.nii.gz", image * 500, affine)
        save_volume(tmp_path / f"s{seed}_mask.nii.gz", mask, affine, label=True)
        rows.append(f"s{seed}.nii.gz,s{seed}_mask.nii.gz")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_evaluate_scores_each_pair_on_its_own_grid(tmp_path, registry):
    import json

    from meshnet_lesion import Segmenter, load_volume
    from meshnet_lesion.cli import main
    from meshnet_lesion.train.metrics import scores

    pairs = _write_pairs(tmp_path, [1, 2])
    assert main(["evaluate", str(pairs), "--model", "t2lesion-meshnet11", "--no-brain-mask", "--device", "cpu",
                 "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())["models"]["t2lesion-meshnet11"]
    assert len(report["subjects"]) == 2
    segmenter = Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", brain_mask=False)
    first = segmenter.segment(load_volume(tmp_path / "s1.nii.gz")).labels
    expected = scores(first > 0, load_volume(tmp_path / "s1_mask.nii.gz").array > 0)
    assert report["subjects"][0]["dice"] == pytest.approx(expected["dice"])
    assert report["subjects"][0]["mcc"] == pytest.approx(expected["mcc"])
    assert report["mean"]["dice"] == pytest.approx(np.mean([s["dice"] for s in report["subjects"]]))


def test_evaluate_leaves_voxels_marked_ignore_out_of_the_scores(tmp_path, registry):
    import json

    from meshnet_lesion import Segmenter, load_volume, save_volume
    from meshnet_lesion.cli import main
    from meshnet_lesion.train.dataset import IGNORE
    from meshnet_lesion.train.metrics import scores

    pairs = _write_pairs(tmp_path, [5])
    mask = np.asarray(load_volume(tmp_path / "s5_mask.nii.gz").array).copy()
    mask[:20] = np.where(mask[:20] > 0, mask[:20], IGNORE)    # half the background is not scored
    save_volume(tmp_path / "s5_mask.nii.gz", mask, np.eye(4), label=True)
    assert main(["evaluate", str(pairs), "--model", "t2lesion-meshnet11", "--no-brain-mask", "--device", "cpu",
                 "--report", str(tmp_path / "report.json")]) == 0
    row = json.loads((tmp_path / "report.json").read_text())["models"]["t2lesion-meshnet11"]["subjects"][0]
    labels = Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", brain_mask=False).segment(
        load_volume(tmp_path / "s5.nii.gz")).labels
    scored = mask != IGNORE
    expected = scores((labels > 0) & scored, mask == 1)
    assert row["dice"] == pytest.approx(expected["dice"]) and row["mcc"] == pytest.approx(expected["mcc"])
    assert row["predicted_ml"] == pytest.approx(np.count_nonzero((labels > 0) & scored) / 1000)


def _touch_nifti(path, value: int = 1):
    from meshnet_lesion import save_volume

    path.parent.mkdir(parents=True, exist_ok=True)
    save_volume(path, np.full((4, 4, 4), value, np.uint8), np.eye(4))


def test_bids_discovery_keeps_space_t2w_with_masks_and_drops_turbo_spin_echo(tmp_path):
    from meshnet_lesion import InputError
    from meshnet_lesion.train.dataset import read_bids, read_pairs_or_bids

    anat = "{s}/ses-1/anat/{s}_ses-1_acq-{a}_run-1_T2w.nii.gz"
    lesion = "derivatives/lesion_masks/{s}/ses-1/anat/{s}_ses-1_acq-{a}_run-1_T2w_desc-lesion_mask.nii.gz"
    for subject, acquisition in (("sub-M1", "spc3p2"), ("sub-M2", "tse3"), ("sub-M3", "spc3")):
        _touch_nifti(tmp_path / anat.format(s=subject, a=acquisition))
        _touch_nifti(tmp_path / lesion.format(s=subject, a=acquisition))
    _touch_nifti(tmp_path / anat.format(s="sub-M3", a="tse3"))          # a second T2w in the same session
    _touch_nifti(tmp_path / anat.format(s="sub-M4", a="spc3p2"))        # no lesion mask: not a pair
    pairs = read_bids(tmp_path)
    assert [(p.subject, p.acquisition) for p in pairs] == [("sub-M1", "spc3p2"), ("sub-M3", "spc3")]
    assert pairs[1].image.name == "sub-M3_ses-1_acq-spc3_run-1_T2w.nii.gz"
    assert read_pairs_or_bids(tmp_path) == [(p.image, p.mask) for p in pairs]
    assert [p.acquisition for p in read_bids(tmp_path, ("tse3",))] == ["tse3"]
    with pytest.raises(InputError, match="lesion_masks"):
        read_bids(tmp_path / "sub-M1")


def test_train_command_writes_an_importable_model(tmp_path):
    from meshnet_lesion import Registry
    from meshnet_lesion.cli import main

    pairs = _write_pairs(tmp_path, [3, 4])
    out = tmp_path / "model" / "meshnet5.safetensors"
    assert main(["train", str(pairs), "-o", str(out), "--channels", "5", "--epochs", "1", "--crop", "32",
                 "--device", "cpu"]) == 0
    assert read_training_record(out)["config"]["channels"] == 5
    entry = Registry(cache_dir=tmp_path / "cache").import_folder(out.parent, "trained-meshnet5")
    assert entry.id == "trained-meshnet5"
    assert main(["train", str(pairs), "-o", str(tmp_path / "model.pt"), "--epochs", "1"]) == 2   # not safetensors
