"""PyTorch training checkpoints of the paper's MeshNet, as the arc-meshchop replication writes them.

One ``.pt`` zip archive holding a dict whose ``model_state_dict`` has ``network.{i}.conv.*`` and
``network.{i}.bn.*`` for the nine 3×3×3 blocks and ``network.9.*`` for the 1×1×1 classifier
(optimizer and scheduler state may sit beside it and are ignored). It is read with
``torch.load(weights_only=True)``, which refuses any pickled code. The dilations are the paper's
(a checkpoint does not store them); the input convention is the replication's own recipe
(closest canonical RAS+ axes, zoom to 1 mm, centred crop/pad to 256³, min-max of the raw intensities).
"""
from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..spec import PAPER_DILATIONS, InputSpec, LayerParams, LoadedModel, paper_spec
from . import ModelFiles

SUFFIXES = (".pt", ".pth", ".ckpt")
ARC_MESHCHOP_INPUT = InputSpec(grid="zoom", orientation="RAS")
_BLOCK = re.compile(r"^network\.(\d+)\.")


def matches(files: ModelFiles) -> bool:
    if "model.json" in files:
        return False
    candidates = files.names(*SUFFIXES)
    return len(candidates) == 1 and zipfile.is_zipfile(files[candidates[0]])


def load(files: ModelFiles) -> LoadedModel:
    path = files[files.names(*SUFFIXES)[0]]
    state = _model_state(read_checkpoint(path), path)
    blocks = len(PAPER_DILATIONS)
    indices = sorted({int(m.group(1)) for key in state if (m := _BLOCK.match(key))})
    if indices != list(range(blocks + 1)):
        raise ModelError(f"{path.name}: expected the paper's MeshNet (blocks network.0-{blocks}), found {indices}")
    try:
        channels = state["network.0.conv.weight"].shape[0]
        classes = state[f"network.{blocks}.weight"].shape[0]
        spec = paper_spec(channels, classes, ARC_MESHCHOP_INPUT)
        params = [LayerParams(state[f"network.{i}.conv.weight"], state[f"network.{i}.conv.bias"],
                              tuple(state[f"network.{i}.bn.{name}"]
                                    for name in ("weight", "bias", "running_mean", "running_var")))
                  for i in range(blocks)]
        params.append(LayerParams(state[f"network.{blocks}.weight"], state[f"network.{blocks}.bias"]))
    except KeyError as error:
        raise ModelError(f"{path.name}: the checkpoint lacks {error}") from error
    return LoadedModel(spec, params)


def read_checkpoint(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never pickled code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for a payload that is not plain data, zip errors, …
        raise ModelError(f"cannot read the checkpoint {path.name} (only plain tensors are accepted): "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def _model_state(checkpoint: Any, path: Path) -> dict[str, np.ndarray]:
    import torch

    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path.name} holds no model state dict")
    return {key: value.detach().float().numpy() for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()}
