"""MeshNet as a PyTorch module (for training, and as a plain-PyTorch reference) and the paper's MeshNet-X.

Inference does not use the module: :mod:`.engine` runs a :class:`~.spec.LoadedModel` (spec + plain
float32 arrays per layer) layer by layer. :meth:`MeshNet.to_loaded` and :meth:`MeshNet.from_loaded`
convert between the two; :meth:`MeshNet.save` / :meth:`MeshNet.load` use our safetensors format
(:mod:`.formats.meshnet`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..formats import meshnet as meshnet_format
from ..spec import LayerParams, LayerSpec, LoadedModel, ModelSpec, paper_spec


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
    def from_loaded(cls, loaded: LoadedModel) -> MeshNet:
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
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()
                 if not key.endswith("num_batches_tracked")}
        meshnet_format.write(Path(path), state, self.spec, metadata)

    @classmethod
    def load(cls, path: str | Path) -> MeshNet:
        spec, state = meshnet_format.read(Path(path))
        module = cls(spec)
        missing, unexpected = module.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ModelError(f"{Path(path).name}: missing weights {missing}, unexpected {unexpected}")
        return module


def build_meshnet(channels: int, num_classes: int = 2) -> MeshNet:
    """The paper's MeshNet-X (5,682 / 56,194 / 147,474 parameters for X = 5 / 16 / 26)."""
    return MeshNet(paper_spec(channels, num_classes))
