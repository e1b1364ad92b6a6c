"""Our own format: one ``.safetensors`` file holding a MeshNet's weights, its spec in the metadata.

Tensor names are those of :class:`~meshnet_lesion.train.model.MeshNet`'s state dict
(``layers.{i}.conv.weight``, ``layers.{i}.norm.running_mean``, …); extra string metadata (the
training record) may sit beside the spec.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..outputs import atomic_file
from ..spec import LayerParams, LoadedModel, ModelSpec
from . import ModelFiles

SPEC_METADATA_KEY = "meshnet_spec"


def matches(files: ModelFiles) -> bool:
    return bool(files.names(".safetensors")) and "model.json" not in files


def load(files: ModelFiles) -> LoadedModel:
    own = files.names(".safetensors")
    if len(own) != 1:
        raise ModelError(f"expected one .safetensors file, found {own}")
    spec, state = read(files[own[0]])
    return loaded_from_state(spec, state)


def read(path: Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The embedded spec and the float32 tensors of one of our files."""
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


def write(path: Path, state: Mapping, spec: ModelSpec, metadata: Mapping[str, str] | None = None) -> None:
    """Write torch tensors and the spec (plus string ``metadata``) atomically: complete or not at all."""
    from safetensors.torch import save_file

    with atomic_file(path) as partial:
        save_file(dict(state), str(partial), metadata={**(metadata or {}), SPEC_METADATA_KEY: spec.to_json()})


def loaded_from_state(spec: ModelSpec, state: Mapping[str, np.ndarray]) -> LoadedModel:
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
