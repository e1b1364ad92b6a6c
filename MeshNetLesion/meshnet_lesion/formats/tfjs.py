"""TensorFlow.js layers-models: ``model.json`` with ``modelTopology`` and a weights manifest, ``.bin`` shards.

Conv3D / BatchNormalization / Activation layers in sequence; kernels are ``[kd, kh, kw, in, out]``
(channels last) in the manifest and become (out, in, d, h, w).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelError
from ..spec import LayerParams, LayerSpec, LoadedModel, ModelSpec, Normalization
from . import ModelFiles


def matches(files: ModelFiles) -> bool:
    return files.json_has("model.json", "modelTopology")


def load(files: ModelFiles) -> LoadedModel:
    config = files.json("model.json")
    spec, names = spec_from_config(config)
    chunks = []
    for group in config["weightsManifest"]:
        for name in group["paths"]:
            if name not in files:
                raise ModelError(f"weight shard {name} is missing")
            chunks.append(np.fromfile(files[name], dtype="<f4"))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    described = sum(int(np.prod(w["shape"])) for group in config["weightsManifest"] for w in group["weights"])
    if described != flat.size:
        raise ModelError(f"weight data holds {flat.size} floats, the manifest describes {described}")
    values: dict[str, np.ndarray] = {}
    offset = 0
    for group in config["weightsManifest"]:
        for weight in group["weights"]:
            size = int(np.prod(weight["shape"]))
            values[weight["name"]] = flat[offset: offset + size].reshape(weight["shape"])
            offset += size
    params = []
    for layer, layer_names in zip(spec.layers, names):
        kernel = values[layer_names[0][0]].transpose(4, 3, 0, 1, 2).astype(np.float32)  # -> (out, in, d, h, w)
        rest = [values[name] for name, _ in layer_names[1:]]
        bias = rest.pop(0) if layer.bias else None
        batch_norm = tuple(rest) if layer.norm == "batch" else None
        params.append(LayerParams(np.ascontiguousarray(kernel), bias, batch_norm))
    return LoadedModel(spec, params)


def spec_from_config(model_json: Mapping[str, Any]) -> tuple[ModelSpec, list[list[tuple[str, list[int]]]]]:
    """A TensorFlow.js layers-model: Conv3D / BatchNormalization / Activation layers in sequence.

    Returns the spec and, per spec layer, the (weight name, shape) pairs it reads from the
    manifest, in manifest order (kernels are ``[kd, kh, kw, in, out]``, channels last).
    """
    try:
        layers_cfg = model_json["modelTopology"]["model_config"]["config"]["layers"]
    except (KeyError, TypeError) as error:
        raise ModelError("not a TensorFlow.js layers-model (no modelTopology.model_config)") from error
    manifest = {w["name"]: (w.get("dtype", "float32"), list(w["shape"]))
                for group in model_json.get("weightsManifest", []) for w in group["weights"]}
    layers: list[dict[str, Any]] = []
    names: list[list[tuple[str, list[int]]]] = []
    for cfg in layers_cfg:
        kind, conf = cfg["class_name"], cfg["config"]
        if kind == "InputLayer":
            continue
        if kind == "Conv3D":
            if conf.get("padding") != "same" or conf.get("data_format", "channels_last") != "channels_last":
                raise ModelError(f"{conf['name']}: only 'same' padding and channels_last are supported")
            strides, dilation, kernel = conf.get("strides", [1, 1, 1]), conf["dilation_rate"], conf["kernel_size"]
            if set(strides) != {1} or len(set(dilation)) != 1 or len(set(kernel)) != 1:
                raise ModelError(f"{conf['name']}: needs stride 1 and isotropic kernel and dilation")
            kernel_name, bias_name = f"{conf['name']}/kernel", f"{conf['name']}/bias"
            if kernel_name not in manifest:
                raise ModelError(f"weight manifest lacks {kernel_name}")
            shape = manifest[kernel_name][1]
            entry = [(kernel_name, shape)]
            if conf.get("use_bias", True):
                entry.append((bias_name, manifest[bias_name][1]))
            layers.append({"in_channels": shape[3], "out_channels": shape[4], "kernel_size": kernel[0],
                           "dilation": dilation[0], "bias": conf.get("use_bias", True),
                           "norm": "none", "activation": _keras_activation(conf.get("activation", "linear"))})
            names.append(entry)
        elif kind == "BatchNormalization":
            if not layers or layers[-1]["norm"] != "none" or layers[-1]["activation"] != "none":
                raise ModelError(f"{conf['name']}: BatchNormalization must follow a convolution directly")
            layers[-1]["norm"] = "batch"
            prefix = conf["name"]
            names[-1].extend((f"{prefix}/{part}", manifest[f"{prefix}/{part}"][1])
                             for part in ("gamma", "beta", "moving_mean", "moving_variance"))
            layers[-1]["bn_eps"] = float(conf.get("epsilon", 1e-3))
        elif kind == "Activation":
            if not layers or layers[-1]["activation"] != "none":
                raise ModelError(f"{conf['name']}: activation without a preceding convolution")
            layers[-1]["activation"] = _keras_activation(conf["activation"])
        else:
            raise ModelError(f"unsupported TensorFlow.js layer type {kind}")
    for dtype, _ in manifest.values():
        if dtype != "float32":
            raise ModelError(f"only float32 TensorFlow.js weights are supported, not {dtype}")
    bn_eps = {layer.pop("bn_eps") for layer in layers if "bn_eps" in layer}
    if len(bn_eps) > 1:
        raise ModelError(f"BatchNormalization layers use different epsilons {sorted(bn_eps)}")
    spec = ModelSpec(tuple(LayerSpec(**layer) for layer in layers), Normalization("minmax"),
                     norm_eps=bn_eps.pop() if bn_eps else 1e-3)
    return spec, names


def _keras_activation(name: str) -> str:
    mapping = {"linear": "none", "relu": "relu", "elu": "elu", "gelu": "gelu"}
    if name not in mapping:
        raise ModelError(f"unsupported activation '{name}'")
    return mapping[name]
