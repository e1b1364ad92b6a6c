"""MeshNet as a PyTorch module (for training) and weight readers for every format we run.

Inference does not use the module: :func:`load_model_files` returns a :class:`LoadedModel` (spec +
plain float32 arrays per layer) that :mod:`.engine` runs layer by layer. Weight files are read
without unpickling: safetensors directly, PyTorch zip state dicts only with ``weights_only=True``,
TensorFlow.js ``.bin`` as raw float32.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .errors import ModelError
from .spec import (ClassSpec, LayerSpec, ModelSpec, Normalization, classes_from_colormap, spec_from_brainchop,
                   spec_from_tfjs)

PAPER_DILATIONS = (1, 2, 4, 8, 16, 16, 8, 4, 2)
SPEC_METADATA_KEY = "meshnet_spec"
LESION_CLASSES = (ClassSpec("background", (0, 0, 0)), ClassSpec("lesion", (230, 25, 25)))


@dataclass
class LayerParams:
    """Weights of one layer: ``weight`` is (out, in, k, k, k); ``batch_norm`` is (gamma, beta, mean, var)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    batch_norm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class LoadedModel:
    spec: ModelSpec
    params: list[LayerParams]

    def __post_init__(self) -> None:
        if len(self.params) != len(self.spec.layers):
            raise ModelError(f"{len(self.params)} weight sets for {len(self.spec.layers)} layers")
        for index, (layer, params) in enumerate(zip(self.spec.layers, self.params)):
            expected = (layer.out_channels, layer.in_channels) + (layer.kernel_size,) * 3
            if tuple(params.weight.shape) != expected:
                raise ModelError(f"layer {index}: weight shape {params.weight.shape}, expected {expected}")
            if layer.bias != (params.bias is not None):
                raise ModelError(f"layer {index}: bias presence does not match the description")
            if (layer.norm == "batch") != (params.batch_norm is not None):
                raise ModelError(f"layer {index}: batch-norm statistics do not match the description")
            arrays = [params.weight] + ([params.bias] if params.bias is not None else []) + list(params.batch_norm or ())
            if not all(np.isfinite(a).all() for a in arrays):
                raise ModelError(f"layer {index}: weights contain NaN or infinite values")

    @property
    def num_parameters(self) -> int:
        return sum(p.weight.size + (p.bias.size if p.bias is not None else 0)
                   + (2 * p.batch_norm[0].size if p.batch_norm is not None else 0) for p in self.params)


# ----------------------------------------------------------------------------- the module

class MeshNetBlock(nn.Module):
    def __init__(self, layer: LayerSpec, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              padding=layer.padding, dilation=layer.dilation, bias=layer.bias)
        if layer.norm == "batch":
            self.norm = nn.BatchNorm3d(layer.out_channels, eps=eps)
        elif layer.norm == "group":
            self.norm = nn.GroupNorm(layer.out_channels, layer.out_channels, eps=eps, affine=False)
        else:
            self.norm = nn.Identity()
        self.act = {"relu": nn.ReLU(inplace=True), "elu": nn.ELU(inplace=True), "gelu": nn.GELU(),
                    "none": nn.Identity()}[layer.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MeshNet(nn.Module):
    """A MeshNet built from a :class:`ModelSpec`; ``forward`` returns logits (N, classes, D, H, W)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.Sequential(*(MeshNetBlock(layer, spec.norm_eps) for layer in spec.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def to_loaded(self) -> LoadedModel:
        """Detach the weights into a :class:`LoadedModel` for the inference engine."""
        params = []
        for block in self.layers:
            conv = block.conv
            batch_norm = None
            if isinstance(block.norm, nn.BatchNorm3d):
                bn = block.norm
                batch_norm = tuple(t.detach().float().cpu().numpy().copy()
                                   for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
            params.append(LayerParams(conv.weight.detach().float().cpu().numpy().copy(),
                                      None if conv.bias is None else conv.bias.detach().float().cpu().numpy().copy(),
                                      batch_norm))
        return LoadedModel(self.spec, params)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> "MeshNet":
        """A module holding a :class:`LoadedModel`'s weights (to fine-tune it, or as a plain PyTorch reference)."""
        module = cls(loaded.spec)
        with torch.no_grad():
            for block, params in zip(module.layers, loaded.params):
                block.conv.weight.copy_(torch.from_numpy(np.asarray(params.weight, np.float32)))
                if params.bias is not None:
                    block.conv.bias.copy_(torch.from_numpy(np.asarray(params.bias, np.float32)))
                if params.batch_norm is not None:
                    for tensor, values in zip((block.norm.weight, block.norm.bias, block.norm.running_mean,
                                               block.norm.running_var), params.batch_norm):
                        tensor.copy_(torch.from_numpy(np.asarray(values, np.float32)))
        return module

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write weights and spec into one safetensors file (the spec sits in its metadata), atomically.

        ``metadata`` adds string entries (e.g. the training record) beside the spec.
        """
        from safetensors.torch import save_file

        path = Path(path)
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()
                 if not key.endswith("num_batches_tracked")}
        partial = path.with_name(f".{path.name}.partial")
        try:
            save_file(state, str(partial), metadata={**(metadata or {}), SPEC_METADATA_KEY: self.spec.to_json()})
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "MeshNet":
        spec, state = _read_own_safetensors(Path(path))
        module = cls(spec)
        missing, unexpected = module.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ModelError(f"{Path(path).name}: missing weights {missing}, unexpected {unexpected}")
        return module


def paper_spec(channels: int, num_classes: int = 2) -> ModelSpec:
    """MeshNet-X of Fedorov et al. 2025: 3×3×3 convs with dilations 1,2,4,8,16,16,8,4,2, each with
    BatchNorm and ReLU, then a 1×1×1 classifier."""
    if channels < 1 or num_classes < 2:
        raise ModelError("MeshNet needs at least 1 channel and 2 classes")
    layers = [LayerSpec(1 if i == 0 else channels, channels, 3, d, True, "batch", "relu")
              for i, d in enumerate(PAPER_DILATIONS)]
    layers.append(LayerSpec(channels, num_classes, 1, 1, True, "none", "none"))
    classes = LESION_CLASSES if num_classes == 2 else ()
    return ModelSpec(tuple(layers), Normalization("minmax"), classes)


def build_meshnet(channels: int, num_classes: int = 2) -> MeshNet:
    """The paper's MeshNet-X (5,682 / 56,194 / 147,474 parameters for X = 5 / 16 / 26)."""
    return MeshNet(paper_spec(channels, num_classes))


# ----------------------------------------------------------------------------- readers

def load_model_files(files: Mapping[str, Path], overrides: Mapping | None = None) -> LoadedModel:
    """Load a model from its files, keyed by file name; the format is recognised from the contents.

    - ``*.safetensors`` with an embedded spec: our own MeshNet files;
    - ``model.json`` with ``modelTopology``: a TensorFlow.js layers-model (weights from its manifest);
    - ``model.json`` with ``layers``: brainchop, weights in ``model.pth`` (safetensors or PyTorch zip).

    A ``colormap.json`` names the classes; ``overrides`` (a registry entry's ``spec``) may replace
    the input normalisation and classes.
    """
    files = {name: Path(path) for name, path in files.items()}
    for name, path in files.items():
        if not path.is_file():
            raise ModelError(f"model file missing: {name} ({path})")
    own = [name for name in files if name.endswith(".safetensors")]
    if own and "model.json" not in files:
        if len(own) != 1:
            raise ModelError(f"expected one .safetensors file, found {own}")
        spec, state = _read_own_safetensors(files[own[0]])
        loaded = _loaded_from_state(spec, state)
    elif "model.json" in files:
        config = _read_json(files["model.json"])
        if "modelTopology" in config:
            loaded = _load_tfjs(config, files)
        elif "layers" in config:
            loaded = _load_brainchop(config, files)
        else:
            raise ModelError("model.json is neither a TensorFlow.js layers-model nor a brainchop layers list")
    else:
        raise ModelError(f"no model description among {sorted(files)} (need model.json or a .safetensors file)")
    spec = loaded.spec
    if "colormap.json" in files:
        classes = classes_from_colormap(_read_json(files["colormap.json"]))
        if len(classes) != spec.num_classes:
            raise ModelError(f"colormap.json names {len(classes)} classes, the model has {spec.num_classes}")
        spec = ModelSpec(spec.layers, spec.normalization, classes, spec.norm_eps)
    return LoadedModel(spec.with_overrides(overrides), loaded.params)


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A flat tensor dict from safetensors or a PyTorch zip archive, never unpickling code."""
    try:
        if zipfile.is_zipfile(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise ModelError(f"{path.name} does not hold a state dict")
            return {key: value.detach().float().numpy() for key, value in state.items()
                    if isinstance(value, torch.Tensor)}
        from safetensors.numpy import load_file

        return {key: value.astype(np.float32, copy=False) for key, value in load_file(str(path)).items()}
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"cannot read weights from {path.name}: {error}") from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path.name}: {error}") from error


def _read_own_safetensors(path: Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key).astype(np.float32, copy=False) for key in handle.keys()}
    except Exception as error:
        raise ModelError(f"cannot read {path.name}: {error}") from error
    if SPEC_METADATA_KEY not in metadata:
        raise ModelError(f"{path.name} has no embedded MeshNet description ('{SPEC_METADATA_KEY}' metadata)")
    try:
        spec = ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY]))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path.name}: malformed embedded description: {error}") from error
    return spec, state


def _loaded_from_state(spec: ModelSpec, state: Mapping[str, np.ndarray]) -> LoadedModel:
    params = []
    try:
        for i, layer in enumerate(spec.layers):
            prefix = f"layers.{i}."
            batch_norm = None
            if layer.norm == "batch":
                batch_norm = tuple(state[prefix + f"norm.{name}"]
                                   for name in ("weight", "bias", "running_mean", "running_var"))
            params.append(LayerParams(state[prefix + "conv.weight"],
                                      state[prefix + "conv.bias"] if layer.bias else None, batch_norm))
    except KeyError as error:
        raise ModelError(f"weights lack {error}") from error
    return LoadedModel(spec, params)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _load_brainchop(config: Mapping, files: Mapping[str, Path]) -> LoadedModel:
    weight_files = [name for name in files if name.endswith((".pth", ".pt", ".safetensors"))]
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
    return LoadedModel(spec_from_brainchop(config, shapes), params)


def _load_tfjs(config: Mapping, files: Mapping[str, Path]) -> LoadedModel:
    spec, names = spec_from_tfjs(config)
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
