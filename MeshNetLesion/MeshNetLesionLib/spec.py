"""One description for every MeshNet we run, and readers for the formats MeshNets are published in.

A :class:`ModelSpec` says what the engine needs and nothing about files: the layers (channels,
kernel, dilation, bias, normalisation, activation), how to normalise the input, and the classes.
Readers turn brainchop's ``layers`` JSON and TensorFlow.js layers-models into a spec; weights are
read by :mod:`.model`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from .errors import ModelError

SPEC_FORMAT = "meshnet-spec/1"
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

    def __post_init__(self) -> None:
        if not self.layers:
            raise ModelError("a model needs at least one layer")
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

    @property
    def receptive_radius(self) -> int:
        """Voxels of context each side that one output voxel depends on."""
        return sum(layer.padding for layer in self.layers)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "ModelSpec":
        """Replace ``normalization`` and/or ``classes`` from a registry entry's ``spec`` section."""
        if not overrides:
            return self
        changes: dict[str, Any] = {}
        if "normalization" in overrides:
            changes["normalization"] = Normalization(**overrides["normalization"])
        if "classes" in overrides:
            changes["classes"] = parse_classes(overrides["classes"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "layers": [asdict(layer) for layer in self.layers],
            "normalization": asdict(self.normalization),
            "classes": [{"name": c.name, "color": list(c.color)} for c in self.classes],
            "norm_eps": self.norm_eps,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        if data.get("format") != SPEC_FORMAT:
            raise ModelError(f"not a {SPEC_FORMAT} description (format: {data.get('format')!r})")
        try:
            return cls(
                layers=tuple(LayerSpec(**layer) for layer in data["layers"]),
                normalization=Normalization(**data.get("normalization", {})),
                classes=parse_classes(data.get("classes", [])),
                norm_eps=float(data.get("norm_eps", 1e-5)),
            )
        except (KeyError, TypeError) as error:
            raise ModelError(f"malformed model description: {error}") from error


def default_classes(count: int) -> tuple[ClassSpec, ...]:
    names = ["background"] + [f"class {i}" for i in range(1, count)]
    return tuple(ClassSpec(name, _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)]) for i, name in enumerate(names))


def parse_classes(items: Sequence[Mapping[str, Any]]) -> tuple[ClassSpec, ...]:
    return tuple(ClassSpec(str(item["name"]), tuple(int(c) for c in item["color"])) for item in items)


def classes_from_colormap(colormap: Mapping[str, Any]) -> tuple[ClassSpec, ...]:
    """brainchop/T2lesion ``colormap.json``: ``labels`` with parallel ``R``, ``G``, ``B`` lists."""
    try:
        labels, red, green, blue = colormap["labels"], colormap["R"], colormap["G"], colormap["B"]
        return tuple(ClassSpec(str(name), (int(r), int(g), int(b)))
                     for name, r, g, b in zip(labels, red, green, blue, strict=True))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"malformed colormap.json: {error}") from error


def spec_from_brainchop(config: Mapping[str, Any], weight_shapes: Sequence[tuple[Sequence[int], bool]]) -> ModelSpec:
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


def spec_from_tfjs(model_json: Mapping[str, Any]) -> tuple[ModelSpec, list[list[tuple[str, list[int]]]]]:
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
