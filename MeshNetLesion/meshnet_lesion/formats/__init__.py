"""Model formats: recognise a model's files and load them into a :class:`~meshnet_lesion.spec.LoadedModel`.

One module per published format, each with ``matches(files)`` and ``load(files)``:

- :mod:`.meshnet`: our ``.safetensors`` (weights with the model spec in the metadata);
- :mod:`.tfjs`: a TensorFlow.js layers-model (``model.json`` with ``modelTopology`` + ``.bin`` shards);
- :mod:`.brainchop`: brainchop's ``model.json`` (a ``layers`` list) + ``model.pth``;
- :mod:`.checkpoint`: a PyTorch training checkpoint of the paper's MeshNet (arc-meshchop's ``final.pt``).

A new format is one module here and one entry in :func:`_formats`. Weight files are read without
unpickling: safetensors directly, PyTorch zip archives only with ``weights_only=True``, TF.js
``.bin`` as raw float32.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ModelError
from ..spec import ClassSpec, LoadedModel


class ModelFiles:
    """A model's files by name (e.g. ``model.json``, ``model.bin``); JSON files are parsed once.

    ``used`` records the files a reader opened, so an import copies those and nothing else.
    """

    def __init__(self, files: Mapping[str, Path | str]) -> None:
        self.paths = {name: Path(path) for name, path in files.items()}
        for name, path in self.paths.items():
            if not path.is_file():
                raise ModelError(f"model file missing: {name} ({path})")
        self._json: dict[str, Any] = {}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def __getitem__(self, name: str) -> Path:
        self.used.add(name)
        return self.paths[name]

    def names(self, *suffixes: str) -> list[str]:
        """File names ending in one of ``suffixes`` (all names if none are given)."""
        return [name for name in self.paths if not suffixes or name.endswith(suffixes)]

    def json(self, name: str) -> Any:
        if name not in self._json:
            self._json[name] = read_json(self[name])
        return self._json[name]

    def json_has(self, name: str, key: str) -> bool:
        """Whether ``name`` is one of the files and a JSON object holding ``key``."""
        return name in self.paths and isinstance(self.json(name), dict) and key in self.json(name)


def _formats() -> tuple[ModuleType, ...]:
    from . import brainchop, checkpoint, meshnet, tfjs

    return (meshnet, tfjs, brainchop, checkpoint)


def load_model_files(files: Mapping[str, Path | str], overrides: Mapping | None = None) -> LoadedModel:
    """Load a model from its files, keyed by file name; the format is recognised from the contents.

    A ``colormap.json`` names the classes; ``overrides`` (a registry entry's ``spec``) may replace
    the input convention, normalisation, standardisation and classes.
    """
    return load_with_files(files, overrides)[0]


def load_with_files(files: Mapping[str, Path | str], overrides: Mapping | None = None) -> tuple[LoadedModel, list[str]]:
    """:func:`load_model_files`, and the names of the files the model was read from."""
    model_files = ModelFiles(files)
    for fmt in _formats():
        if fmt.matches(model_files):
            try:
                loaded = fmt.load(model_files)
            except ModelError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
                raise ModelError(f"malformed {fmt.__name__.rsplit('.', 1)[-1]} model: {type(error).__name__} "
                                 f"{error}") from error
            break
    else:
        if "model.json" in model_files:
            raise ModelError("model.json is neither a TensorFlow.js layers-model nor a brainchop layers list")
        raise ModelError(f"no model description among {sorted(model_files.paths)} "
                         "(need model.json, a .safetensors file or a PyTorch checkpoint)")
    spec = loaded.spec
    if "colormap.json" in model_files:
        classes = classes_from_colormap(model_files.json("colormap.json"))
        if len(classes) != spec.num_classes:
            raise ModelError(f"colormap.json names {len(classes)} classes, the model has {spec.num_classes}")
        spec = replace(spec, classes=classes)
    return LoadedModel(spec.with_overrides(overrides), loaded.params), sorted(model_files.used)


def classes_from_colormap(colormap: Mapping[str, Any]) -> tuple[ClassSpec, ...]:
    """brainchop/T2lesion ``colormap.json``: ``labels`` with parallel ``R``, ``G``, ``B`` lists."""
    try:
        labels, red, green, blue = colormap["labels"], colormap["R"], colormap["G"], colormap["B"]
        if not len(labels) == len(red) == len(green) == len(blue):   # zip's strict flag needs Python 3.10 (Slicer 5.8 has 3.9)
            raise ValueError(f"{len(labels)} labels for {len(red)}/{len(green)}/{len(blue)} R/G/B values")
        return tuple(ClassSpec(str(name), (int(r), int(g), int(b))) for name, r, g, b in zip(labels, red, green, blue))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"malformed colormap.json: {error}") from error


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelError(f"cannot read {path.name}: {error}") from error


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A flat tensor dict from safetensors or a PyTorch zip archive, never unpickling code."""
    try:
        if zipfile.is_zipfile(path):
            import torch

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
