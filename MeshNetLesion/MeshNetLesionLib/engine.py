"""Layer-by-layer MeshNet inference: no autograd, BatchNorm folded, slabs, progress and cancel.

MeshNet has no skip connections, so only two activations are alive at once: the input of the
current layer and its output. Each layer is computed in slabs along the first axis (each slab
reads its input rows plus a halo of ``dilation`` rows), which bounds temporary memory, gives
progress and cancellation points well under a second apart, and lets brainchop's GroupNorm
gather its whole-volume statistics in a first pass before it normalises in a second.
The classifier layer is fused with softmax/argmax, so the logits of all classes are never
materialised for the whole volume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, DeviceError
from .model import LoadedModel
from .spec import LayerSpec

ProgressCallback = Callable[[float, str], None]
# Target size of one slab's output. Bigger slabs run faster (fewer halo rows, fewer calls); on the
# CPU a 256 MB slab of a 256³ volume still finishes in well under a second per slab.
SLAB_BYTES_CPU = 256 * 2 ** 20
SLAB_BYTES_GPU = 2 * 2 ** 30
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class EngineOutput:
    labels: np.ndarray                       # argmax class per voxel, same shape as the input
    probabilities: np.ndarray | None         # (len(probability_classes), *shape) float32, softmax
    device: str
    precision: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Layer:
    spec: LayerSpec
    weight: torch.Tensor
    bias: torch.Tensor | None


def available_devices() -> dict[str, str | None]:
    """Each device kind mapped to None if usable here, else the reason it is not."""
    reasons: dict[str, str | None] = {"cpu": None}
    if torch.cuda.is_available():
        reasons["cuda"] = None
    elif torch.version.cuda is None:
        reasons["cuda"] = f"this PyTorch ({torch.__version__}) is built without CUDA"
    else:
        reasons["cuda"] = "no CUDA GPU is visible to PyTorch"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        reasons["mps"] = None
    else:
        reasons["mps"] = "Apple Metal (MPS) is not available on this machine"
    return reasons


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is missing is an error."""
    name = (name or "auto").lower()
    reasons = available_devices()
    if name == "auto":
        for kind in ("cuda", "mps"):
            if reasons[kind] is None:
                return torch.device(kind)
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in reasons:
        raise DeviceError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if reasons[kind] is not None:
        raise DeviceError(f"device '{name}' was requested but {reasons[kind]}")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' was requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in _PRECISIONS:
        raise DeviceError(f"unknown precision '{precision}' (use auto, fp32, fp16 or bf16)")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("fp16 is not supported on the CPU; use fp32 or bf16")
    return precision


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Engine:
    """Runs one loaded model. Build once, call :meth:`run` for each volume."""

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto") -> None:
        self.spec = model.spec
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self._layers = [self._fold(layer, params) for layer, params in zip(model.spec.layers, model.params)]
        weights = [layer.macs_per_voxel for layer in model.spec.layers]
        self._layer_share = [w / sum(weights) for w in weights]

    def _fold(self, layer: LayerSpec, params) -> _Layer:
        weight = torch.from_numpy(np.asarray(params.weight, dtype=np.float32)).double()
        bias = None if params.bias is None else torch.from_numpy(np.asarray(params.bias, np.float32)).double()
        if params.batch_norm is not None:
            gamma, beta, mean, var = (torch.from_numpy(np.asarray(a, np.float32)).double() for a in params.batch_norm)
            scale = gamma / torch.sqrt(var + self.spec.norm_eps)
            weight = weight * scale[:, None, None, None, None]
            bias = beta + ((bias if bias is not None else 0.0) - mean) * scale
        return _Layer(layer, weight.float(), None if bias is None else bias.float())

    def run(self, volume: np.ndarray, *, probability_classes: Sequence[int] = (),
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> EngineOutput:
        """Segment a normalised (D, H, W) float32 array. Falls back to the CPU on GPU out-of-memory."""
        if volume.ndim != 3:
            raise ValueError(f"engine input must be 3D, got {volume.shape}")
        try:
            return self._run(volume, self.device, self.precision, probability_classes, progress, cancel)
        except Exception as error:  # noqa: BLE001 - only out-of-memory on a GPU is retried
            if self.device.type == "cpu" or not _is_out_of_memory(error):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            output = self._run(volume, torch.device("cpu"), "fp32", probability_classes, progress, cancel)
            output.warnings.append(f"{self.device} ran out of memory; the run was repeated on the CPU")
            return output

    @torch.inference_mode()
    def _run(self, volume: np.ndarray, device: torch.device, precision: str, probability_classes: Sequence[int],
             progress: ProgressCallback | None, cancel: CancelToken | None) -> EngineOutput:
        dtype = _PRECISIONS[precision]
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        done = 0.0
        for index, layer in enumerate(self._layers[:-1]):
            share = self._layer_share[index]
            stage = f"layer {index + 1} of {len(self._layers)}"
            x = self._conv_layer(x, layer, device, dtype, _Reporter(progress, cancel, done, share, stage))
            done += share
        labels, probabilities = self._classifier(
            x, self._layers[-1], device, dtype, list(probability_classes),
            _Reporter(progress, cancel, done, self._layer_share[-1], f"layer {len(self._layers)} of {len(self._layers)}"))
        if progress is not None:
            progress(1.0, "network done")
        return EngineOutput(labels, probabilities, str(device), precision)

    def _slabs(self, channels: int, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> list[tuple[int, int]]:
        depth, height, width = shape
        per_row = max(1, channels * height * width * torch.finfo(dtype).bits // 8)
        budget = SLAB_BYTES_CPU if device.type == "cpu" else SLAB_BYTES_GPU
        rows = int(max(1, min(depth, budget // per_row)))
        return [(start, min(depth, start + rows)) for start in range(0, depth, rows)]

    @staticmethod
    def _slab_input(x: torch.Tensor, start: int, stop: int, pad: int) -> torch.Tensor:
        depth = x.shape[2]
        lo, hi = max(0, start - pad), min(depth, stop + pad)
        piece = x[:, :, lo:hi]
        if lo > start - pad or hi < stop + pad:
            piece = F.pad(piece, (0, 0, 0, 0, lo - (start - pad), (stop + pad) - hi))
        return piece

    def _conv(self, piece: torch.Tensor, layer: _Layer, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        weight = layer.weight.to(device=device, dtype=dtype)
        bias = None if layer.bias is None else layer.bias.to(device=device, dtype=dtype)
        pad = layer.spec.padding
        return F.conv3d(piece, weight, bias, padding=(0, pad, pad), dilation=layer.spec.dilation)

    def _conv_layer(self, x: torch.Tensor, layer: _Layer, device: torch.device, dtype: torch.dtype,
                    report: "_Reporter") -> torch.Tensor:
        spec = layer.spec
        shape = x.shape[2:]
        out = torch.empty((1, spec.out_channels, *shape), device=device, dtype=dtype,
                          memory_format=torch.channels_last_3d)
        slabs = self._slabs(max(spec.in_channels, spec.out_channels), shape, dtype, device)
        group_norm = spec.norm == "group"
        sums = torch.zeros(spec.out_channels, dtype=torch.float64, device=device)
        squares = torch.zeros_like(sums)
        passes = 2 if group_norm else 1
        for step, (start, stop) in enumerate(slabs):
            report.check()
            y = self._conv(self._slab_input(x, start, stop, spec.padding), layer, device, dtype)
            if group_norm:
                # Channels-last memory is a (voxels, channels) matrix: two small matrix products give
                # each channel's sum and sum of squares far faster than a strided reduction.
                rows = y.permute(0, 2, 3, 4, 1).reshape(-1, spec.out_channels).float()
                sums += (torch.ones(1, rows.shape[0], device=device) @ rows)[0].double()
                squares += torch.diagonal(rows.T @ rows).double()
            else:
                _activate_(y, spec.activation)
            out[:, :, start:stop] = y
            del y
            report((step + 1) / (len(slabs) * passes))
        del x
        if group_norm:
            count = float(np.prod(shape))
            mean = sums / count
            inv_std = torch.rsqrt((squares / count - mean * mean).clamp_min(0.0) + self.spec.norm_eps)
            mean_t = mean.to(dtype).view(1, -1, 1, 1, 1)
            inv_t = inv_std.to(dtype).view(1, -1, 1, 1, 1)
            for step, (start, stop) in enumerate(slabs):
                report.check()
                piece = out[:, :, start:stop]
                piece.sub_(mean_t).mul_(inv_t)
                _activate_(piece, spec.activation)
                report((len(slabs) + step + 1) / (2 * len(slabs)))
        return out

    def _classifier(self, x: torch.Tensor, layer: _Layer, device: torch.device, dtype: torch.dtype,
                    probability_classes: list[int], report: "_Reporter") -> tuple[np.ndarray, np.ndarray | None]:
        spec = layer.spec
        shape = tuple(x.shape[2:])
        label_dtype = np.uint8 if spec.out_channels <= 256 else np.int16
        labels = np.empty(shape, dtype=label_dtype)
        probabilities = np.empty((len(probability_classes), *shape), np.float32) if probability_classes else None
        slabs = self._slabs(max(spec.in_channels, spec.out_channels), shape, dtype, device)
        for step, (start, stop) in enumerate(slabs):
            report.check()
            logits = self._conv(self._slab_input(x, start, stop, spec.padding), layer, device, dtype).float()
            _activate_(logits, spec.activation)
            labels[start:stop] = logits.argmax(dim=1)[0].to(torch.int16).cpu().numpy().astype(label_dtype)
            if probabilities is not None:
                soft = torch.softmax(logits, dim=1)[0, probability_classes]
                probabilities[:, start:stop] = soft.cpu().numpy()
            report((step + 1) / len(slabs))
        return labels, probabilities


def _activate_(t: torch.Tensor, activation: str) -> None:
    if activation == "relu":
        F.relu_(t)
    elif activation == "elu":
        F.elu_(t)
    elif activation == "gelu":
        t.copy_(F.gelu(t))  # torch has no in-place GELU


class _Reporter:
    """Maps a layer's own 0..1 progress into the run's and checks for cancellation."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelToken | None, start: float, share: float,
                 stage: str) -> None:
        self.progress, self.cancel, self.start, self.share, self.stage = progress, cancel, start, share, stage

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("segmentation was cancelled")

    def __call__(self, fraction: float) -> None:
        if self.progress is not None:
            self.progress(min(1.0, self.start + self.share * fraction), self.stage)
