"""brainchop's format: ``model.json`` with a ``layers`` list, weights in ``model.pth``.

``model.pth`` is a PyTorch zip state dict (read with ``weights_only=True``) or, despite the name,
safetensors. Convolutions are matched to the ``layers`` list in natural key order.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ModelError
from ..spec import LayerParams, LayerSpec, LoadedModel, ModelSpec, Normalization
from . import ModelFiles, read_state_dict

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def matches(files: ModelFiles) -> bool:
    return files.json_has("model.json", "layers")


def load(files: ModelFiles) -> LoadedModel:
    config = files.json("model.json")
    weight_files = files.names(*WEIGHT_SUFFIXES)
    if len(weight_files) != 1:
        raise ModelError(f"brainchop model needs one weight file (model.pth), found {weight_files}")
    state = read_state_dict(files[weight_files[0]])
    kernels = sorted((key for key, value in state.items() if value.ndim == 5), key=_natural_key)
    used = set(kernels)
    params, shapes = [], []
    for key in kernels:
        bias_key = key[: -len("weight")] + "bias" if key.endswith("weight") else None
        bias = state.get(bias_key) if bias_key else None
        if bias is not None:
            used.add(bias_key)
        params.append(LayerParams(state[key], bias))
        shapes.append((state[key].shape, bias is not None))
    extra = sorted(set(state) - used)
    if extra:
        raise ModelError(f"unexpected tensors in {weight_files[0]}: {extra[:5]}")
    return LoadedModel(spec_from_config(config, shapes), params)


def spec_from_config(config: Mapping[str, Any], weight_shapes: Sequence[tuple[Sequence[int], bool]]) -> ModelSpec:
    """brainchop ``model.json`` (a ``layers`` list) plus, per convolution, (weight shape, has bias).

    brainchop builds conv → GroupNorm (if ``bnorm``; one group per channel, no affine) → ELU,
    GELU or ReLU for every layer but the last, which is a bare convolution. ``-1`` channel
    placeholders, and hidden widths a placeholder config leaves at a default, are taken from the
    weights; an explicit width that disagrees with the weights is an error.
    """
    try:
        layers_cfg = list(config["layers"])
    except (KeyError, TypeError) as error:
        raise ModelError("brainchop model.json has no 'layers' list") from error
    if len(layers_cfg) != len(weight_shapes):
        raise ModelError(f"model.json lists {len(layers_cfg)} layers but the weights hold "
                         f"{len(weight_shapes)} convolutions")
    placeholders = layers_cfg[0].get("in_channels") == -1 or layers_cfg[-1].get("out_channels") == -1
    activation = "elu" if config.get("elu") else "gelu" if config.get("gelu") else "relu"
    norm = "group" if config.get("bnorm") else "none"
    layers = []
    for index, (cfg, (shape, has_bias)) in enumerate(zip(layers_cfg, weight_shapes)):
        out_ch, in_ch, *kernel = shape
        if len(kernel) != 3 or len(set(kernel)) != 1:
            raise ModelError(f"layer {index}: expected a cubic 3D kernel, weight shape {tuple(shape)}")
        if not placeholders:
            declared = (cfg.get("in_channels"), cfg.get("out_channels"), cfg.get("kernel_size"))
            if declared != (in_ch, out_ch, kernel[0]):
                raise ModelError(f"layer {index}: model.json says (in, out, kernel) = {declared}, "
                                 f"the weights say {(in_ch, out_ch, kernel[0])}")
        dilation = int(cfg.get("dilation", 1))
        if int(cfg.get("padding", dilation * (kernel[0] // 2))) != dilation * (kernel[0] // 2):
            raise ModelError(f"layer {index}: only 'same' padding is supported")
        last = index == len(layers_cfg) - 1
        layers.append(LayerSpec(in_ch, out_ch, kernel[0], dilation, bias=has_bias,
                                norm="none" if last else norm, activation="none" if last else activation))
    return ModelSpec(tuple(layers), Normalization("quantile"))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
