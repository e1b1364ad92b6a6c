"""What a MeshNet is: one description for every MeshNet we run, and its weights once read.

A :class:`ModelSpec` says what the engine needs and nothing about files: the layers (channels,
kernel, dilation, bias, normalisation, activation), how to normalise the input, and the classes.
A :class:`LoadedModel` is a spec with its weights as plain float32 arrays, checked against it;
the readers in :mod:`.formats` produce one from each published format.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .errors import ModelError

SPEC_FORMAT = "meshnet-spec/1"
# Far beyond any MeshNet (9-30 layers of 5-32 channels), small enough to refuse a hostile or broken file early.
MAX_LAYERS, MAX_CHANNELS, MAX_KERNEL, MAX_DILATION = 256, 4096, 15, 256
NORMS = ("none", "batch", "group")
ACTIVATIONS = ("none", "relu", "elu", "gelu")
# Colours for classes that a model file does not name (background first).
_DEFAULT_COLOURS = [(0, 0, 0), (230, 25, 25), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


@dataclass(frozen=True)
class LayerSpec:
    """One convolution, then optional normalisation, then optional activation.

    ``norm="group"`` is brainchop's GroupNorm with one group per channel and no affine: its
    statistics are taken over the whole volume at run time. ``norm="batch"`` is BatchNorm with
    running statistics, folded into the convolution at load. Padding is always "same"
    (``dilation * (kernel_size // 2)``).
    """

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    dilation: int = 1
    bias: bool = True
    norm: str = "none"
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ModelError(f"unknown normalisation '{self.norm}' (expected one of {NORMS})")
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"unknown activation '{self.activation}' (expected one of {ACTIVATIONS})")
        if self.kernel_size % 2 != 1 or self.kernel_size < 1:
            raise ModelError(f"kernel size must be odd, not {self.kernel_size}")
        if min(self.in_channels, self.out_channels, self.dilation) < 1:
            raise ModelError(f"invalid layer {self}")
        if max(self.in_channels, self.out_channels) > MAX_CHANNELS or self.kernel_size > MAX_KERNEL \
                or self.dilation > MAX_DILATION:
            raise ModelError(f"implausible layer (at most {MAX_CHANNELS} channels, kernel {MAX_KERNEL}, "
                             f"dilation {MAX_DILATION}): {self}")

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel_size // 2)

    @property
    def macs_per_voxel(self) -> int:
        return self.in_channels * self.out_channels * self.kernel_size ** 3


@dataclass(frozen=True)
class Normalization:
    """Input intensity normalisation: ``minmax`` to [0, 1], or ``quantile`` (low → 0, high → 1, clipped)."""

    method: str = "minmax"
    low: float = 0.02
    high: float = 0.98
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "quantile"):
            raise ModelError(f"unknown input normalisation '{self.method}'")


GRIDS = ("conform", "zoom")
_AXIS_LETTERS = ("LR", "PA", "IS")


@dataclass(frozen=True)
class InputSpec:
    """How a scan becomes the 256³ array the network sees: each model was trained on one way, and only that works.

    ``grid``:

    - ``conform``: ``niimath -conform`` / FreeSurfer ``mri_convert --conform``: a 256³ 1 mm grid
      centred on the scan, trilinear, intensities rescaled to 0–255 by a robust maximum and rounded
      (brainchop and T2lesion models);
    - ``zoom``: the arc-meshchop recipe: the scan's closest canonical (RAS+) axes,
      ``scipy.ndimage.zoom`` to 1 mm, centred crop or zero pad to 256³, raw intensities.

    ``orientation``: where the array axes the network sees point, e.g. ``LIA`` (as conformed) or
    ``RAS`` (canonical); any other order is the same grid with axes flipped or swapped.
    """

    grid: str = "conform"
    orientation: str = "LIA"

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ModelError(f"unknown input grid '{self.grid}' (expected one of {GRIDS})")
        code = str(self.orientation).upper()
        if len(code) != 3 or sorted(next((i for i, pair in enumerate(_AXIS_LETTERS) if c in pair), -1)
                                    for c in code) != [0, 1, 2]:
            raise ModelError(f"orientation must be three axis letters such as LIA or RAS, not '{self.orientation}'")
        object.__setattr__(self, "orientation", code)


@dataclass(frozen=True)
class Standardization:
    """Brain intensities mapped onto the distribution the model was trained on (landmark standardisation).

    After normalisation, the intensities at ``percentiles`` of the brain's voxels are mapped
    piecewise-linearly onto ``landmarks``: the same percentiles of a reference training scan through
    the model's own input convention. 0 (background) stays 0, the last segment extends beyond the
    last landmark, the result is clipped to [0, 1]. A scan like the reference is left as it is;
    another scale, a non-linear intensity response or a missing scalp is brought back to it
    (Nyúl & Udupa's histogram standardisation, with a few landmarks).
    """

    percentiles: tuple[float, ...]
    landmarks: tuple[float, ...]

    def __post_init__(self) -> None:
        percentiles = tuple(float(p) for p in self.percentiles)
        landmarks = tuple(float(v) for v in self.landmarks)
        if len(percentiles) < 2 or len(percentiles) != len(landmarks):
            raise ModelError("standardisation needs at least two percentiles and one landmark for each")
        if any(b <= a for a, b in zip(percentiles, percentiles[1:])) or not 0 <= percentiles[0] < percentiles[-1] <= 100:
            raise ModelError(f"standardisation percentiles must rise within 0-100: {percentiles}")
        if any(b <= a for a, b in zip(landmarks, landmarks[1:])):
            raise ModelError(f"standardisation landmarks must rise: {landmarks}")
        object.__setattr__(self, "percentiles", percentiles)
        object.__setattr__(self, "landmarks", landmarks)


@dataclass(frozen=True)
class ClassSpec:
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ModelSpec:
    layers: tuple[LayerSpec, ...]
    normalization: Normalization = field(default_factory=Normalization)
    classes: tuple[ClassSpec, ...] = ()
    norm_eps: float = 1e-5
    input: InputSpec = field(default_factory=InputSpec)
    standardization: Standardization | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ModelError("a model needs at least one layer")
        if len(self.layers) > MAX_LAYERS:
            raise ModelError(f"implausible model: {len(self.layers)} layers (at most {MAX_LAYERS})")
        for previous, layer in zip(self.layers, self.layers[1:]):
            if previous.out_channels != layer.in_channels:
                raise ModelError(f"layer channels do not chain: {previous.out_channels} -> {layer.in_channels}")
        if self.layers[0].in_channels != 1:
            raise ModelError("MeshNet takes one input channel")
        if not self.classes:
            object.__setattr__(self, "classes", default_classes(self.num_classes))
        if len(self.classes) != self.num_classes:
            raise ModelError(f"{len(self.classes)} class names for {self.num_classes} output channels")

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_channels

    @property
    def macs_per_voxel(self) -> int:
        return sum(layer.macs_per_voxel for layer in self.layers)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> ModelSpec:
        """Replace ``input``, ``normalization``, ``standardization`` and/or ``classes`` from a registry entry's ``spec``."""
        if not overrides:
            return self
        changes: dict[str, Any] = {}
        try:
            if "input" in overrides:
                changes["input"] = InputSpec(**overrides["input"])
            if "normalization" in overrides:
                changes["normalization"] = Normalization(**overrides["normalization"])
            if "standardization" in overrides:
                changes["standardization"] = Standardization(**overrides["standardization"])
            if "classes" in overrides:
                changes["classes"] = parse_classes(overrides["classes"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"malformed model description override: {error}") from error
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "layers": [asdict(layer) for layer in self.layers],
            "normalization": asdict(self.normalization),
            "classes": [{"name": c.name, "color": list(c.color)} for c in self.classes],
            "norm_eps": self.norm_eps,
            "input": asdict(self.input),
            "standardization": None if self.standardization is None else asdict(self.standardization),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        if data.get("format") != SPEC_FORMAT:
            raise ModelError(f"not a {SPEC_FORMAT} description (format: {data.get('format')!r})")
        try:
            return cls(
                layers=tuple(LayerSpec(**layer) for layer in data["layers"]),
                normalization=Normalization(**data.get("normalization", {})),
                classes=parse_classes(data.get("classes", [])),
                norm_eps=float(data.get("norm_eps", 1e-5)),
                input=InputSpec(**data.get("input", {})),
                standardization=(Standardization(**data["standardization"]) if data.get("standardization")
                                 else None),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"malformed model description: {error}") from error


# The paper's MeshNet-X: nine 3×3×3 convolutions with these dilations, each with BatchNorm and ReLU,
# then a 1×1×1 classifier.
PAPER_DILATIONS = (1, 2, 4, 8, 16, 16, 8, 4, 2)
LESION_CLASSES = (ClassSpec("background", (0, 0, 0)), ClassSpec("lesion", (230, 25, 25)))


def paper_spec(channels: int, num_classes: int = 2, input: InputSpec | None = None) -> ModelSpec:
    """MeshNet-X of Fedorov et al. 2025 (5,682 / 56,194 / 147,474 parameters for X = 5 / 16 / 26)."""
    if channels < 1 or num_classes < 2:
        raise ModelError("MeshNet needs at least 1 channel and 2 classes")
    layers = [LayerSpec(1 if i == 0 else channels, channels, 3, d, True, "batch", "relu")
              for i, d in enumerate(PAPER_DILATIONS)]
    layers.append(LayerSpec(channels, num_classes, 1, 1, True, "none", "none"))
    classes = LESION_CLASSES if num_classes == 2 else ()
    return ModelSpec(tuple(layers), Normalization("minmax"), classes, input=input or InputSpec())


def default_classes(count: int) -> tuple[ClassSpec, ...]:
    names = ["background"] + [f"class {i}" for i in range(1, count)]
    return tuple(ClassSpec(name, _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)]) for i, name in enumerate(names))


def parse_classes(items: Sequence[Mapping[str, Any]]) -> tuple[ClassSpec, ...]:
    return tuple(ClassSpec(str(item["name"]), tuple(int(c) for c in item["color"])) for item in items)


@dataclass
class LayerParams:
    """Weights of one layer: ``weight`` is (out, in, k, k, k); ``batch_norm`` is (gamma, beta, mean, var)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    batch_norm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class LoadedModel:
    """A spec and its weights, checked against each other (shapes, bias, BatchNorm, finite values)."""

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
