"""MeshNet architecture, model description and the weight readers, on the real published weights."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from meshnet_lesion import ModelError, load_model_files
from meshnet_lesion.spec import LayerSpec, ModelSpec, paper_spec
from meshnet_lesion.train.model import MeshNet, build_meshnet


class _Payload:
    """An arbitrary Python object: loading it would need unpickling code."""


@pytest.mark.parametrize("channels, expected", [(5, 5_682), (16, 56_194), (26, 147_474)])
def test_paper_parameter_counts(channels, expected):
    model = build_meshnet(channels)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_paper_architecture():
    spec = build_meshnet(26).spec
    assert [layer.dilation for layer in spec.layers] == [1, 2, 4, 8, 16, 16, 8, 4, 2, 1]
    assert [layer.kernel_size for layer in spec.layers] == [3] * 9 + [1]
    assert all(layer.norm == "batch" and layer.activation == "relu" for layer in spec.layers[:-1])
    assert spec.layers[-1].out_channels == 2 and spec.layers[-1].activation == "none"
    out = build_meshnet(5).eval()(torch.zeros(1, 1, 12, 10, 8))
    assert out.shape == (1, 2, 12, 10, 8)


def test_spec_json_round_trip():
    spec = paper_spec(16, 3)
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
    with pytest.raises(ModelError):
        ModelSpec.from_dict({"format": "something-else"})
    with pytest.raises(ModelError, match="do not chain"):
        ModelSpec((LayerSpec(1, 4), LayerSpec(5, 2)))


def test_own_safetensors_reload_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = build_meshnet(5)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for block in model.layers[:-1]:
            block.norm.running_mean.uniform_(-0.5, 0.5)
            block.norm.running_var.uniform_(0.5, 2.0)
    model.save(tmp_path / "m.safetensors")
    again = MeshNet.load(tmp_path / "m.safetensors")
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(a, b), key
    loaded = load_model_files({"m.safetensors": tmp_path / "m.safetensors"})
    assert loaded.spec == model.spec and loaded.num_parameters == 5_682


def _files(registry, entry_id):
    return registry.fetch(entry_id)


def test_module_from_loaded_weights_is_the_same_network(registry):
    """The ARC-trained T2lesion weights in a PyTorch module (for fine-tuning) give the same logits."""
    loaded = registry.load("t2lesion-meshnet11")
    module = MeshNet.from_loaded(loaded).eval()
    again = module.to_loaded()
    for a, b in zip(loaded.params, again.params):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
    trained = build_meshnet(5).train()
    with torch.no_grad():
        trained(torch.rand(2, 1, 12, 12, 12))  # moves the BatchNorm running statistics
    copy = MeshNet.from_loaded(trained.to_loaded()).eval()
    x = torch.rand(1, 1, 10, 11, 12)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), trained.eval()(x), rtol=0, atol=0)


def test_reads_tfjs_t2lesion(registry):
    loaded = load_model_files(_files(registry, "t2lesion-meshnet11"))
    spec = loaded.spec
    assert [layer.dilation for layer in spec.layers] == [1, 2, 4, 8, 16, 8, 4, 2, 1, 1]
    assert spec.layers[0].in_channels == 1 and spec.layers[0].out_channels == 11
    assert all(layer.activation == "elu" for layer in spec.layers[:-1]) and spec.num_classes == 2
    assert spec.normalization.method == "minmax"
    assert loaded.num_parameters == 26_556
    # kernel [kd, kh, kw, in, out] -> (out, in, kd, kh, kw): check one element against the raw file
    raw = np.fromfile(registry.fetch("t2lesion-meshnet11")["model.bin"], dtype="<f4")
    kernel = raw[:27 * 11].reshape(3, 3, 3, 1, 11)
    assert loaded.params[0].weight[7, 0, 2, 0, 1] == kernel[2, 0, 1, 0, 7]


def test_reads_brainchop_zip_state_dict_with_placeholders(registry):
    loaded = registry.load("brainchop-mindgrab")
    spec = loaded.spec
    assert len(spec.layers) == 26
    assert spec.layers[0].out_channels == 15 and spec.layers[-1].out_channels == 2  # -1 placeholders filled
    assert all(layer.norm == "group" and layer.activation == "gelu" and not layer.bias for layer in spec.layers[:-1])
    assert spec.layers[-1].bias and spec.normalization.method == "quantile"
    assert loaded.num_parameters == 146_237  # the MindGrab paper's count


def test_reads_brainchop_safetensors(registry):
    tissue = registry.load("brainchop-tissue-fast")
    assert tissue.spec.num_classes == 3 and tissue.spec.layers[0].out_channels == 5
    assert [c.name for c in tissue.spec.classes] == ["background", "white matter", "grey matter"]
    subcortical = registry.load("brainchop-subcortical")
    assert subcortical.spec.num_classes == 18 and subcortical.spec.classes[3].name == "Lateral-Ventricle"


def test_tfjs_reader_with_batchnorm_matches_pytorch(tmp_path):
    """Write a MeshNet (with BatchNorm) as a TensorFlow.js layers-model and read it back."""
    torch.manual_seed(1)
    model = build_meshnet(4).eval()
    with torch.no_grad():
        for block in model.layers[:-1]:
            block.norm.running_mean.uniform_(-0.2, 0.2)
            block.norm.running_var.uniform_(0.5, 1.5)
            block.norm.weight.uniform_(0.5, 1.5)
    layers, weights, blobs = [{"class_name": "InputLayer", "config": {"name": "input"}}], [], []
    for i, block in enumerate(model.layers):
        conv = block.conv
        layers.append({"class_name": "Conv3D", "config": {
            "name": f"c{i}", "filters": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "strides": [1, 1, 1], "dilation_rate": list(conv.dilation), "padding": "same",
            "data_format": "channels_last", "activation": "linear", "use_bias": True}})
        kernel = conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
        weights += [{"name": f"c{i}/kernel", "shape": list(kernel.shape), "dtype": "float32"},
                    {"name": f"c{i}/bias", "shape": [conv.out_channels], "dtype": "float32"}]
        blobs += [kernel, conv.bias.detach().numpy()]
        if isinstance(block.norm, torch.nn.BatchNorm3d):
            bn = block.norm
            layers.append({"class_name": "BatchNormalization", "config": {"name": f"b{i}", "epsilon": bn.eps}})
            for part, tensor in zip(("gamma", "beta", "moving_mean", "moving_variance"),
                                    (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
                weights.append({"name": f"b{i}/{part}", "shape": [bn.num_features], "dtype": "float32"})
                blobs.append(tensor.detach().numpy())
            layers.append({"class_name": "Activation", "config": {"name": f"a{i}", "activation": "relu"}})
    topology = {"format": "layers-model", "modelTopology": {"model_config": {"config": {"layers": layers}}},
                "weightsManifest": [{"paths": ["w.bin"], "weights": weights}]}
    (tmp_path / "model.json").write_text(json.dumps(topology))
    np.concatenate([b.astype("<f4").ravel() for b in blobs]).tofile(tmp_path / "w.bin")
    loaded = load_model_files({"model.json": tmp_path / "model.json", "w.bin": tmp_path / "w.bin"})
    assert loaded.spec.layers == model.spec.layers

    from meshnet_lesion.engine import Engine

    x = np.random.default_rng(0).random((20, 18, 16), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)[None, None]), 1)[0, 1].numpy()
    got = Engine(loaded, "cpu").run(x, probability_classes=[1]).probabilities[0]
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_corrupt_and_mismatched_weights_are_clear_errors(registry, tmp_path):
    files = registry.fetch("brainchop-tissue-fast")
    truncated = tmp_path / "model.pth"
    truncated.write_bytes(files["model.pth"].read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model_files({"model.json": files["model.json"], "model.pth": truncated})
    # the architecture in model.json must agree with the tensors
    config = json.loads(files["model.json"].read_text())
    config["layers"][3]["out_channels"] = 7
    (tmp_path / "model.json").write_text(json.dumps(config))
    shutil.copy(files["model.pth"], tmp_path / "good.pth")
    with pytest.raises(ModelError, match="layer 3"):
        load_model_files({"model.json": tmp_path / "model.json", "good.pth": tmp_path / "good.pth"})
    tfjs = registry.fetch("t2lesion-meshnet11")
    short = tmp_path / "model.bin"
    short.write_bytes(tfjs["model.bin"].read_bytes()[:-8])
    with pytest.raises(ModelError, match="manifest"):
        load_model_files({"model.json": tfjs["model.json"], "model.bin": short})
    with pytest.raises(ModelError, match="missing"):
        load_model_files({"model.json": tfjs["model.json"], "model.bin": tmp_path / "absent.bin"})


def test_pickled_checkpoints_are_refused(tmp_path):
    """A .pth that needs unpickling of arbitrary objects is rejected (weights_only=True)."""
    torch.save({"layer": _Payload()}, tmp_path / "model.pth")
    (tmp_path / "model.json").write_text(json.dumps({"layers": [{"in_channels": 1, "out_channels": 2,
                                                                 "kernel_size": 1, "padding": 0, "dilation": 1}]}))
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model_files({"model.json": tmp_path / "model.json", "model.pth": tmp_path / "model.pth"})
