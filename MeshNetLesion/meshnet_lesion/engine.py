"""Layer-by-layer MeshNet inference: streamed through all layers at once, BatchNorm folded, fp32 by default.

MeshNet has no skip connections and no down-sampling, so it can be computed as a wavefront: the
volume is cut into thin slabs along its first axis and every layer advances a few rows at a
time, each keeping only the rows the next layer still needs (its slab plus twice the next
layer's dilation). Memory then scales with the sum of the dilations, not with the volume: for
MeshNet-26 at 256³ the activations take about 1 GB instead of the 3.5 GB of two whole fp32
buffers, and each slab stays cache-warm between its convolution and activation.

brainchop's GroupNorm (one group per channel, statistics over the whole volume) cannot be
streamed: such a layer is computed over the whole volume in slabs, its statistics gathered in a
first pass and applied in a second, and the streamed segments run between these barriers.
The classifier is fused with softmax/argmax, so the logits of all classes are never kept.

Hidden channels are zero-padded to widths the CPU convolution kernels handle well (e.g. 5 → 8,
15 → 16): the padded channels stay exactly zero, so the result is the same network; only the
order of floating-point additions changes (measured: labels equal on ≥ 99.999 % of voxels).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .devices import PRECISIONS, resolve_device, resolve_precision
from .errors import ModelError, ResourceError
from .progress import CancelToken, Progress, ProgressCallback
from .spec import LayerSpec, LoadedModel, ModelSpec
from .streaming import Tracker, Window, activate_, add_statistics, along_rows, as_rows

# Bytes of one layer's output per streaming step (CPU) and per slab of a GroupNorm layer. Small
# steps keep the working set in cache and the peak memory low; on a GPU one step is the volume.
STEP_BYTES_CPU = 28 * 2 ** 20
SLAB_BYTES_CPU = 256 * 2 ** 20
STEP_BYTES_GPU = 4 * 2 ** 30
# aten::convolution.out writes into a given tensor (absent from some older PyTorch builds).
_CONV_OUT = getattr(getattr(torch.ops.aten, "convolution", None), "out", None)
_MKLDNN_CONV = getattr(torch.ops.aten, "mkldnn_convolution", None) if torch.backends.mkldnn.is_available() else None
# PyTorch sends a CPU float convolution to its slow reference kernels (slow_conv3d,
# slow_conv_dilated3d) when N·C·D·H ≤ 20480 — "for some case, native is faster" in
# aten/src/ATen/native/Convolution.cpp. For our thin slabs (8 channels, 10 rows of 256, or the
# 1-channel input) oneDNN is 3–40× faster, so such pieces call it directly.
_SLOW_PATH_LIMIT = 20480


def _takes_slow_kernel(piece: torch.Tensor) -> bool:
    return (_MKLDNN_CONV is not None and piece.device.type == "cpu" and piece.dtype == torch.float32
            and piece.shape[0] * piece.shape[1] * piece.shape[2] * piece.shape[3] <= _SLOW_PATH_LIMIT)


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
    weight: torch.Tensor          # BatchNorm folded, float32, (out, in, k, k, k)
    bias: torch.Tensor | None


@dataclass
class _Prepared:
    """The layers on one device and dtype, hidden channels zero-padded to their run widths."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    widths: list[int]             # output channels of each layer as run
    background: _Background | None = None   # a cropped run's background (Engine.run's ``surround``)


@dataclass
class _Background:
    """The background around a crop, followed through the layers of one run.

    Away from the head every layer's activation is a per-channel constant. Storing each layer's
    output minus its constant makes the convolutions' zero padding stand for that constant; the
    next layer's bias then gains ``W_sum @ constant`` (the kernel's weights summed per input
    channel), which is exact. A GroupNorm layer adds the constant, ``voxels`` times, to its sums.
    """

    voxels: int                 # background voxels outside the crop
    constant: torch.Tensor      # the next layer's input outside the crop, per channel (float64)
    shifts: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> constant its output is stored minus


def padded_width(channels: int, device: torch.device) -> int:
    """The channel count a hidden layer is run with (zero-padded; the network is unchanged).

    CPU: oneDNN's 3D convolution is several times slower below 8 channels and gains from one
    extra channel to reach a multiple of 8 below 24 (e.g. 15 -> 16); padding further costs more
    arithmetic than it saves (measured with ``lab/benchmarks/conv_widths.py``). GPU: multiples of 8,
    the granularity of fp16 tensor cores.
    """
    if device.type != "cpu":
        return -(-channels // 8) * 8
    if channels < 8:
        return 8
    if channels % 8 == 7 and channels < 24:
        return channels + 1
    return channels


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text or "not enough memory" in text)


def memory_estimate(spec: ModelSpec, shape: Sequence[int] = (256, 256, 256), bytes_per_value: int = 4) -> int:
    """Bytes of activations the engine holds at its peak for ``spec`` on a volume of ``shape`` (not PyTorch itself).

    A GroupNorm layer holds its whole input and output; a run of streamed layers holds its whole
    input, a window of rows per layer (its slab plus twice the next dilation) and its whole output
    (labels and one probability map after the classifier). The peak is the largest of these.
    """
    depth, height, width = (int(n) for n in shape)
    plane = height * width * bytes_per_value
    volume = depth * plane
    widest = max(layer.out_channels for layer in spec.layers)
    step = max(1, min(depth, STEP_BYTES_CPU // max(widest * plane, 1)))
    peak, index, layers = 0, 0, spec.layers
    while index < len(layers):
        if layers[index].norm == "group":
            peak = max(peak, (layers[index].in_channels + layers[index].out_channels) * volume)
            index += 1
            continue
        start = index
        while index < len(layers) and layers[index].norm != "group":
            index += 1
        windows = sum(layers[j].out_channels * min(depth, 2 * layers[j + 1].padding + step) * plane * 3 // 2
                      for j in range(start, index - 1))
        output = 2 * volume if index == len(layers) else layers[index - 1].out_channels * volume
        peak = max(peak, layers[start].in_channels * volume + windows + output)
    return int(peak + 2 * volume)                        # the normalised input and its padded copy


class Engine:
    """Runs one loaded model. Build once, call :meth:`run` for each volume."""

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto") -> None:
        self.spec = model.spec
        if self.spec.layers[-1].norm != "none":
            raise ModelError("the last layer must be a plain convolution (the classifier)")
        self.device = resolve_device(device)
        self.precision, self._warnings = resolve_precision(precision, self.device)
        self._layers = [self._fold(layer, params) for layer, params in zip(model.spec.layers, model.params)]
        self._prepared: dict[tuple, _Prepared] = {}

    def _fold(self, layer: LayerSpec, params) -> _Layer:
        weight = torch.from_numpy(np.asarray(params.weight, dtype=np.float32)).double()
        bias = None if params.bias is None else torch.from_numpy(np.asarray(params.bias, np.float32)).double()
        if params.batch_norm is not None:
            gamma, beta, mean, var = (torch.from_numpy(np.asarray(a, np.float32)).double() for a in params.batch_norm)
            scale = gamma / torch.sqrt(var + self.spec.norm_eps)
            weight = weight * scale[:, None, None, None, None]
            bias = beta + ((bias if bias is not None else 0.0) - mean) * scale
        return _Layer(layer, weight.float(), None if bias is None else bias.float())

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> _Prepared:
        key = (device.type, device.index, dtype)
        if key not in self._prepared:
            last = len(self._layers) - 1
            widths = [layer.spec.out_channels if i == last else padded_width(layer.spec.out_channels, device)
                      for i, layer in enumerate(self._layers)]
            weights, biases = [], []
            for i, layer in enumerate(self._layers):
                in_width = 1 if i == 0 else widths[i - 1]
                k = layer.spec.kernel_size
                weight = torch.zeros(widths[i], in_width, k, k, k)
                weight[: layer.weight.shape[0], : layer.weight.shape[1]] = layer.weight
                weights.append(weight.to(device=device, dtype=dtype))
                if layer.bias is None:
                    biases.append(None)
                else:
                    bias = torch.zeros(widths[i])
                    bias[: layer.bias.shape[0]] = layer.bias
                    biases.append(bias.to(device=device, dtype=dtype))
            self._prepared[key] = _Prepared(weights, biases, widths)
        return self._prepared[key]

    def run(self, volume: np.ndarray, *, probability_classes: Sequence[int] = (),
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            surround: int = 0) -> EngineOutput:
        """Segment a normalised (D, H, W) float32 array. Falls back to the CPU on GPU out-of-memory.

        ``surround``: the array is a crop of a larger grid whose other ``surround`` voxels are background
        (0). The run then computes what the whole grid would give away from its edges: each layer sees
        the background's own activation outside the crop instead of zeros, and whole-volume GroupNorm
        statistics count the background voxels the crop left out (see :func:`_background`).
        """
        if volume.ndim != 3:
            raise ValueError(f"engine input must be 3D, got {volume.shape}")
        try:
            try:
                output = self._run(volume, self.device, self.precision, probability_classes, progress, cancel,
                                   surround)
            except Exception as error:  # noqa: BLE001 - only out-of-memory on a GPU is retried
                if self.device.type == "cpu" or not _is_out_of_memory(error):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                output = self._run(volume, torch.device("cpu"), "fp32", probability_classes, progress, cancel,
                                   surround)
                output.warnings.append(f"{self.device} ran out of memory; the run was repeated on the CPU")
        except Exception as error:  # noqa: BLE001 - the CPU's own out-of-memory becomes one clear line
            if not _is_out_of_memory(error):
                raise
            need = memory_estimate(self.spec, volume.shape) / 2 ** 30
            raise ResourceError(f"not enough memory: this model needs about {need + 1:.1f} GiB for a "
                                f"{'x'.join(map(str, volume.shape))} volume (its activations and PyTorch); "
                                "close other programs or use a machine with more memory") from error
        output.warnings[:0] = self._warnings
        return output

    @torch.inference_mode()
    def _run(self, volume: np.ndarray, device: torch.device, precision: str, probability_classes: Sequence[int],
             progress: ProgressCallback | None, cancel: CancelToken | None, surround: int = 0) -> EngineOutput:
        dtype = PRECISIONS[precision]
        prepared = self._prepare(device, dtype)
        if surround:  # this run's own biases and shifts (see _background)
            prepared = _Prepared(prepared.weights, list(prepared.biases), prepared.widths,
                                 background=_Background(surround, torch.zeros(1, device=device, dtype=torch.float64)))
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        tracker = Tracker(Progress(progress, cancel), [layer.spec.macs_per_voxel for layer in self._layers],
                           volume.shape[0])
        result = None
        for start, stop in self._segments():
            if self._layers[start].spec.norm == "group":
                x = self._group_norm_layer(x, start, prepared, tracker)
            else:
                x, result = self._stream(x, start, stop, prepared, list(probability_classes), tracker)
        labels, probabilities = result
        tracker.done()
        return EngineOutput(labels, probabilities, str(device), precision)

    def _segments(self) -> list[tuple[int, int]]:
        """Runs of streamable layers, with each GroupNorm layer as a segment of its own."""
        segments, start = [], 0
        for i, layer in enumerate(self._layers):
            if layer.spec.norm == "group":
                if start < i:
                    segments.append((start, i))
                segments.append((i, i + 1))
                start = i + 1
        if start < len(self._layers):
            segments.append((start, len(self._layers)))
        return segments

    # ---------------------------------------------------------------- convolution helpers
    def _conv(self, piece: torch.Tensor, index: int, prepared: _Prepared, depth_padding: int = 0) -> torch.Tensor:
        """Layer ``index`` on ``piece`` (padded in-plane, and by ``depth_padding`` along the first axis)."""
        spec = self._layers[index].spec
        padding = [depth_padding, spec.padding, spec.padding]
        if _takes_slow_kernel(piece):
            return _MKLDNN_CONV(piece, prepared.weights[index], prepared.biases[index], padding, [1, 1, 1],
                                [spec.dilation] * 3, 1)
        return F.conv3d(piece, prepared.weights[index], prepared.biases[index], padding=padding,
                        dilation=spec.dilation)

    def _conv_into(self, piece: torch.Tensor, index: int, prepared: _Prepared, out: torch.Tensor | None = None):
        """Layer ``index`` on rows that include its halo; writes into ``out`` (a buffer view) if given.

        Writing into the destination saves a copy and, more importantly on the CPU, a fresh
        allocation whose pages would be faulted in again for every slab.
        """
        if out is not None and _CONV_OUT is not None and not _takes_slow_kernel(piece):
            spec = self._layers[index].spec
            _CONV_OUT(piece, prepared.weights[index], prepared.biases[index], [1, 1, 1], [0, spec.padding, spec.padding],
                      [spec.dilation] * 3, False, [0, 0, 0], 1, out=out)
            return out
        y = self._conv(piece, index, prepared)
        if out is None:
            return y
        out.copy_(y)
        return out

    @staticmethod
    def _step_rows(bytes_per_step: int, channels: int, shape: Sequence[int], dtype: torch.dtype) -> int:
        depth, height, width = shape
        per_row = channels * height * width * torch.finfo(dtype).bits // 8
        return int(max(1, min(depth, bytes_per_step // max(per_row, 1))))

    # ---------------------------------------------------------------- a cropped run's background
    @staticmethod
    def _background_bias(index: int, prepared: _Prepared) -> torch.Tensor:
        """Fold the background constant of layer ``index``'s input into its bias; returns the layer's
        (pre-activation) output in the background, per channel."""
        weight = prepared.weights[index]
        bias = prepared.biases[index]
        value = weight.sum(dim=(2, 3, 4)).double() @ prepared.background.constant.expand(weight.shape[1])
        if bias is not None:
            value = value + bias.double()
        prepared.biases[index] = value.to(weight.dtype)
        return value

    @staticmethod
    def _background_output(index: int, prepared: _Prepared, value: torch.Tensor, activation: str) -> None:
        """Layer ``index``'s activated output in the background: stored as the shift of its output."""
        value = value.clone()
        activate_(value, activation)
        prepared.background.constant = value
        if bool(value.abs().max() > 0):
            prepared.background.shifts[index] = value.to(prepared.weights[index].dtype)

    @staticmethod
    def _shift_(t: torch.Tensor, index: int, prepared: _Prepared) -> None:
        if prepared.background is not None and index in prepared.background.shifts:
            as_rows(t).sub_(along_rows(prepared.background.shifts[index], t.shape[-1]))

    # ---------------------------------------------------------------- streamed segments
    def _stream(self, x: torch.Tensor, start: int, stop: int, prepared: _Prepared, probability_classes: list[int],
                tracker: Tracker) -> tuple[torch.Tensor | None, tuple | None]:
        """Run layers [start, stop) as a wavefront over rows of the first axis.

        Layer j computes up to ``step`` new rows once its input holds them plus its padding, and
        never more than layer j+1 will read next (``step + padding(j+1)`` rows past layer j+1's
        position); so each window holds at most ``2·padding(j+1) + step`` rows. Windows begin and
        end with ``padding(j+1)`` zero rows, so every read is a plain view of the buffer.
        """
        depth, height, width = x.shape[2:]
        final = stop == len(self._layers)
        count = stop - start
        if prepared.background is not None:
            for index in range(start, stop):
                value = self._background_bias(index, prepared)
                if index < len(self._layers) - 1:
                    self._background_output(index, prepared, value, self._layers[index].spec.activation)
        pads = [self._layers[start + j].spec.padding for j in range(count)]
        widest = max(prepared.widths[start:stop])
        budget = STEP_BYTES_CPU if x.device.type == "cpu" else STEP_BYTES_GPU
        step = self._step_rows(budget, widest, (depth, height, width), x.dtype)
        source = Window.holding(x, pads[0])
        windows = [Window(prepared.widths[start + j], pads[j + 1], 2 * pads[j + 1] + step, (depth, height, width), x)
                   for j in range(count - 1)]
        out = labels = probabilities = None
        if final:
            classes = self._layers[-1].spec.out_channels
            labels = np.empty((depth, height, width), dtype=np.uint8 if classes <= 256 else np.int16)
            if probability_classes:
                probabilities = np.empty((len(probability_classes), depth, height, width), np.float32)
        else:
            out = torch.empty((1, prepared.widths[stop - 1], depth, height, width), device=x.device, dtype=x.dtype,
                              memory_format=torch.channels_last_3d)
        produced = [0] * count
        while produced[-1] < depth:
            advanced = False
            for j in range(count):
                target = min(depth, produced[j] + step)
                if j < count - 1:  # no further than the next layer will read next
                    target = min(target, produced[j + 1] + step + pads[j + 1])
                if target <= produced[j]:
                    continue
                available = depth if j == 0 else produced[j - 1]
                if available < min(depth, target + pads[j]):
                    continue
                tracker.check()
                feed = source if j == 0 else windows[j - 1]
                piece = feed.rows(produced[j] - pads[j], target + pads[j])
                spec = self._layers[start + j].spec
                if j < count - 1:
                    y = self._conv_into(piece, start + j, prepared, windows[j].reserve(target - produced[j]))
                    activate_(y, spec.activation)
                    self._shift_(y, start + j, prepared)
                    windows[j].commit(target - produced[j], finished=target == depth)
                elif final:
                    self._classify(piece, start + j, prepared, probability_classes, labels, probabilities,
                                   produced[j], target)
                else:
                    y = self._conv_into(piece, start + j, prepared, out[:, :, produced[j]:target])
                    activate_(y, spec.activation)
                    self._shift_(y, start + j, prepared)
                if j > 0:
                    windows[j - 1].discard_below(target - pads[j])
                tracker.advance(start + j, target - produced[j])
                produced[j] = target
                advanced = True
            if not advanced:
                raise RuntimeError("streaming scheduler made no progress")  # a bug, not a user error
        return out, ((labels, probabilities) if final else None)

    def _classify(self, piece: torch.Tensor, index: int, prepared: _Prepared, probability_classes: list[int],
                  labels: np.ndarray, probabilities: np.ndarray | None, lo: int, hi: int) -> None:
        """The classifier on rows [lo, hi), straight to labels (and probabilities).

        A 1×1×1 classifier on channels-last rows is one (voxels × channels) @ (channels × classes)
        matrix product; PyTorch's 3D convolution would take its slow im2col path for so few output
        channels. With two classes, argmax is ``l1 > l0`` and softmax is ``sigmoid(l1 - l0)``.
        """
        spec = self._layers[index].spec
        if spec.kernel_size == 1 and piece.is_contiguous(memory_format=torch.channels_last_3d):
            channels = piece.shape[1]
            matrix = piece.permute(0, 2, 3, 4, 1).reshape(-1, channels)
            logits = torch.addmm(prepared.biases[index], matrix, prepared.weights[index].view(-1, channels).T) \
                if prepared.biases[index] is not None else matrix @ prepared.weights[index].view(-1, channels).T
            logits = logits.float()
        else:
            logits = self._conv_into(piece, index, prepared).float().permute(0, 2, 3, 4, 1).reshape(-1, spec.out_channels)
        activate_(logits, spec.activation)
        shape = (hi - lo, *labels.shape[1:])
        if logits.shape[1] == 2:
            margin = logits[:, 1] - logits[:, 0]
            labels[lo:hi] = (margin > 0).view(shape).cpu().numpy()
            if probabilities is not None:
                pair = torch.stack((-margin, margin), dim=1).sigmoid_()
                probabilities[:, lo:hi] = pair[:, probability_classes].T.reshape(-1, *shape).cpu().numpy()
            return
        labels[lo:hi] = logits.argmax(dim=1).view(shape).to(torch.int16).cpu().numpy().astype(labels.dtype)
        if probabilities is not None:
            probabilities[:, lo:hi] = torch.softmax(logits, dim=1)[:, probability_classes].T.reshape(-1, *shape).cpu().numpy()

    # ---------------------------------------------------------------- GroupNorm layers (barriers)
    def _group_norm_layer(self, x: torch.Tensor, index: int, prepared: _Prepared, tracker: Tracker) -> torch.Tensor:
        """Whole-volume GroupNorm (one group per channel, no affine): conv + statistics, then normalise."""
        spec = self._layers[index].spec
        depth, height, width = x.shape[2:]
        channels = prepared.widths[index]
        background = None if prepared.background is None else self._background_bias(index, prepared)
        tracker.check()
        # The whole volume in one call: the convolution pads the ends itself and its output is the
        # layer's buffer (in slabs, each output would be copied into it: 13 % of MindGrab's time).
        out = self._conv(x, index, prepared, spec.padding).contiguous(memory_format=torch.channels_last_3d)
        del x
        budget = SLAB_BYTES_CPU if out.device.type == "cpu" else STEP_BYTES_GPU
        rows = self._step_rows(budget, channels, (depth, height, width), out.dtype)
        slabs = [(lo, min(depth, lo + rows)) for lo in range(0, depth, rows)]
        sums = torch.zeros(channels, dtype=torch.float64, device=out.device)
        squares = torch.zeros_like(sums)
        for lo, hi in slabs:
            tracker.check()
            add_statistics(out[:, :, lo:hi], sums, squares)
            tracker.advance(index, (hi - lo) / 2)
        count = float(depth * height * width)
        if background is not None:  # the voxels outside the crop, all at the background's value
            voxels = prepared.background.voxels
            sums += voxels * background
            squares += voxels * background * background
            count += voxels
        mean = sums / count
        inv_std = torch.rsqrt((squares / count - mean * mean).clamp_min(0.0) + self.spec.norm_eps)
        if background is not None:
            self._background_output(index, prepared, (background - mean) * inv_std, spec.activation)
        mean_t, inv_t = (along_rows(v.to(out.dtype), width) for v in (mean, inv_std))
        for lo, hi in slabs:
            tracker.check()
            piece = out[:, :, lo:hi]
            as_rows(piece).sub_(mean_t).mul_(inv_t)
            activate_(piece, spec.activation)
            self._shift_(piece, index, prepared)
            tracker.advance(index, (hi - lo) / 2)
        return out
