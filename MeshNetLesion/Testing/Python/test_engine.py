"""The inference engine against plain PyTorch, and its progress, cancel, device and OOM behaviour."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from meshnet_lesion import Cancelled, DeviceError
from meshnet_lesion import engine as engine_module
from meshnet_lesion.devices import available_devices, cpu_has_native_bf16, resolve_device
from meshnet_lesion.engine import Engine
from meshnet_lesion.spec import LayerSpec, ModelSpec
from meshnet_lesion.train.model import MeshNet, build_meshnet


def _random_batchnorm(model: MeshNet, seed: int) -> MeshNet:
    """Random BatchNorm statistics and He-scaled weights, so activations stay O(1) through the depth.

    Larger weights grow logits to hundreds, and then fp32 rounding alone (which differs between
    CPUs' kernels) moves probabilities by more than any tolerance that would still catch a bug.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.layers:
            fan_in = block.conv.weight[0].numel()
            block.conv.weight.normal_(0, (2.0 / fan_in) ** 0.5, generator=generator)
            if isinstance(block.norm, torch.nn.BatchNorm3d):
                block.norm.running_mean.uniform_(-0.3, 0.3, generator=generator)
                block.norm.running_var.uniform_(0.5, 2.0, generator=generator)
                block.norm.weight.uniform_(0.5, 1.5, generator=generator)
                block.norm.bias.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()


@pytest.fixture
def small_slabs(monkeypatch):
    """Force many slabs and streaming steps, so halos, windows and per-slab statistics are exercised."""
    monkeypatch.setattr(engine_module, "SLAB_BYTES_CPU", 4096)
    monkeypatch.setattr(engine_module, "STEP_BYTES_CPU", 4096)


def _naive(model: MeshNet, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)[None, None]), dim=1)[0]


@pytest.mark.parametrize("classes", [2, 3])  # two classes take the sigmoid shortcut
def test_engine_matches_naive_pytorch_with_folded_batchnorm(small_slabs, classes):
    model = _random_batchnorm(build_meshnet(6, num_classes=classes), seed=3)
    x = np.random.default_rng(0).random((37, 29, 23), dtype=np.float32)
    expected = _naive(model, x)
    out = Engine(model.to_loaded(), "cpu").run(x, probability_classes=list(range(classes)))
    np.testing.assert_allclose(out.probabilities, expected.numpy(), atol=1e-4)  # folding reorders rounding
    agree = (out.labels == expected.argmax(0).numpy()).mean()
    assert agree > 0.999


def test_group_norm_uses_whole_volume_statistics(small_slabs):
    """brainchop-style GroupNorm (one group per channel, no affine) equals torch.nn.GroupNorm."""
    layers = (LayerSpec(1, 4, 3, 1, False, "group", "gelu"), LayerSpec(4, 4, 3, 4, False, "group", "elu"),
              LayerSpec(4, 2, 1, 1, True, "none", "none"))
    model = MeshNet(ModelSpec(layers)).eval()
    torch.manual_seed(2)
    x = np.random.default_rng(1).random((30, 21, 17), dtype=np.float32) * 3
    expected = _naive(model, x)
    out = Engine(model.to_loaded(), "cpu").run(x, probability_classes=[1])
    np.testing.assert_allclose(out.probabilities[0], expected[1].numpy(), atol=2e-5)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_a_cropped_run_with_its_surround_is_the_whole_grid_run(small_slabs, norm):
    """A crop whose margin exceeds the receptive field, run with ``surround``, gives the whole grid's output:
    outside the crop every layer is at the background's constant, and GroupNorm counts those voxels."""
    activations = ("gelu", "elu", "relu")
    layers = tuple(LayerSpec(1 if i == 0 else 4, 4, 3, d, True, norm, activations[i])
                   for i, d in enumerate((1, 2, 1))) + (LayerSpec(4, 2, 1, 1, True, "none", "none"),)
    torch.manual_seed(5)
    model = MeshNet(ModelSpec(layers)).eval()
    if norm == "batch":
        model = _random_batchnorm(model, seed=5)
    whole = np.zeros((40, 36, 32), np.float32)
    whole[14:26, 12:24, 10:22] = np.random.default_rng(2).random((12, 12, 12), dtype=np.float32) + 0.5
    engine = Engine(model.to_loaded(), "cpu")
    expected = engine.run(whole, probability_classes=[1]).probabilities[0]
    box = (slice(9, 31), slice(7, 29), slice(5, 27))     # margin 5 > receptive radius 4
    crop = np.ascontiguousarray(whole[box])
    out = engine.run(crop, probability_classes=[1], surround=whole.size - crop.size).probabilities[0]
    plain = engine.run(crop, probability_classes=[1]).probabilities[0]  # zeros outside, crop-only statistics
    error, plain_error = np.abs(out - expected[box]).mean(), np.abs(plain - expected[box]).mean()
    if norm == "batch":
        np.testing.assert_allclose(out, expected[box], atol=2e-5)
        assert plain_error > 1e-3                          # so the surround really is what makes them equal
    else:  # the whole grid's own zero padding at its edges moves its statistics a little: not exact there
        assert error < 0.1 * plain_error, (error, plain_error)


def test_cpu_fp32_is_deterministic():
    model = _random_batchnorm(build_meshnet(5), seed=4)
    engine = Engine(model.to_loaded(), "cpu")
    x = np.random.default_rng(2).random((48, 40, 36), dtype=np.float32)
    first, second = engine.run(x, probability_classes=[1]), engine.run(x, probability_classes=[1])
    assert np.array_equal(first.probabilities, second.probabilities)
    assert np.array_equal(first.labels, second.labels)


def test_progress_is_monotone_per_layer_and_ends_at_one(small_slabs):
    engine = Engine(build_meshnet(3).to_loaded(), "cpu")
    seen: list[tuple[float, str]] = []
    engine.run(np.zeros((20, 16, 16), np.float32), progress=lambda f, s: seen.append((f, s)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = {s for _, s in seen}
    assert {f"layer {i} of 10" for i in range(1, 11)} <= stages


def test_cancel_raises_and_stops_early(small_slabs):
    engine = Engine(build_meshnet(3).to_loaded(), "cpu")
    cancel = threading.Event()
    calls = []

    def progress(fraction, stage):
        calls.append(fraction)
        if fraction > 0.3:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.run(np.zeros((20, 16, 16), np.float32), progress=progress, cancel=cancel)
    assert max(calls) < 0.6  # stopped at the next slab, not at the end


def test_missing_devices_give_clear_errors():
    reasons = available_devices()
    assert reasons["cpu"] is None
    if reasons["cuda"] is not None:
        with pytest.raises(DeviceError, match="cuda"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="fp16"):
        Engine(build_meshnet(3).to_loaded(), "cpu", "fp16")
    assert resolve_device("auto").type in ("cpu", "cuda")


class _FakeMps:
    """torch.backends.mps on a Mac (never run here): available, whatever its 3D convolutions do."""

    @staticmethod
    def is_available():
        return True


def test_auto_never_picks_apples_mps_and_an_mps_that_fails_meshnet_is_refused(monkeypatch):
    """Before: auto picked MPS whenever it was available, unchecked (some 3D convolutions are missing there)."""
    from meshnet_lesion import devices

    monkeypatch.setattr(torch.backends, "mps", _FakeMps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # here the probe's conv3d on "mps" fails as it would on an MPS without 3D dilated convolutions
    assert "cannot run MeshNet" in available_devices()["mps"]
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(DeviceError, match="Apple Metal .MPS. cannot run MeshNet"):
        resolve_device("mps")
    monkeypatch.setattr(devices, "_mps_runs_meshnet", lambda: None)   # an MPS that passes the probe
    assert available_devices()["mps"] is None and resolve_device("mps").type == "mps"
    assert resolve_device("auto").type == "cpu"   # still only when asked for


def test_an_older_torch_than_the_minimum_is_refused_with_what_to_do(monkeypatch, tmp_path):
    from meshnet_lesion import devices, worker

    assert devices.torch_version("2.13.0+cpu") == (2, 13) and devices.torch_version("2.6") == (2, 6)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(DeviceError, match="older than 2.6.*update it"):
        devices.check_torch_version()
    (tmp_path / "request.json").write_text('{"action": "devices"}')
    lines = []
    monkeypatch.setattr(worker, "_send", lambda kind, payload=True: lines.append((kind, payload)))
    assert worker.main([str(tmp_path)]) == 1   # the worker says so before it loads anything
    assert lines[-1][0] == "error" and "older than 2.6" in lines[-1][1]["message"]


def test_out_of_memory_on_gpu_retries_on_cpu(monkeypatch):
    """No GPU here: the GPU run is simulated by a stand-in that raises PyTorch's OOM error."""
    engine = Engine(build_meshnet(3).to_loaded(), "cpu")
    engine.device = torch.device("cuda")
    real_run = Engine._run

    def run(self, volume, device, *args):
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, volume, device, *args)

    monkeypatch.setattr(Engine, "_run", run)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = engine.run(np.zeros((8, 8, 8), np.float32))
    assert out.device == "cpu" and out.precision == "fp32"
    assert "out of memory" in out.warnings[0]


def test_bf16_runs_where_the_cpu_has_it_and_agrees_with_fp32():
    model = _random_batchnorm(build_meshnet(4), seed=5)
    x = np.random.default_rng(3).random((24, 20, 16), dtype=np.float32)
    fp32 = Engine(model.to_loaded(), "cpu", "fp32").run(x, probability_classes=[1])
    requested = Engine(model.to_loaded(), "cpu", "bf16").run(x, probability_classes=[1])
    if cpu_has_native_bf16():
        assert requested.precision == "bf16" and not requested.warnings
    else:
        assert requested.precision == "fp32" and "no native bf16" in requested.warnings[0]
    # the bf16 path itself (emulated on CPUs without bf16 units; small input, so still quick)
    engine = Engine(model.to_loaded(), "cpu", "fp32")
    bf16 = engine._run(x, torch.device("cpu"), "bf16", [1], None, None)
    assert bf16.precision == "bf16"
    assert np.abs(bf16.probabilities - fp32.probabilities).max() < 0.1


def test_hidden_channels_are_padded_without_changing_the_network():
    model = _random_batchnorm(build_meshnet(5), seed=6)
    engine = Engine(model.to_loaded(), "cpu")
    prepared = engine._prepare(torch.device("cpu"), torch.float32)
    assert prepared.widths == [8] * 9 + [2]  # 5 -> 8 on the CPU
    assert torch.count_nonzero(prepared.weights[1][5:]) == 0 and torch.count_nonzero(prepared.weights[1][:, 5:]) == 0
    x = np.random.default_rng(4).random((20, 18, 16), dtype=np.float32)
    np.testing.assert_allclose(engine.run(x, probability_classes=[1]).probabilities[0],
                               _naive(model, x)[1].numpy(), atol=1e-4)
