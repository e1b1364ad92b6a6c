"""``auto`` precision on a CPU with native bf16: the faster of fp32 and bf16 for each network, measured.

Whether bf16 pays depends on the CPU, the PyTorch build and the network's shapes: on an AMD EPYC
with AVX-512 BF16, MeshNet-26 runs about 2x faster in bf16 while oneDNN gave MindGrab's 15-channel
layers no gain until its per-channel arithmetic was vectorised (``streaming.as_rows``). So nothing is
assumed: the engine itself runs a small volume in both precisions, and bf16 is chosen only when it
is clearly faster. The choice is remembered per CPU, PyTorch version, thread count and network
shape in the user cache (``precision.json``), so the few seconds of measuring are spent once.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .devices import cpu_has_native_bf16, resolve_precision
from .engine import Engine
from .machine import cpu_name
from .outputs import atomic_file
from .registry import default_cache_dir
from .spec import LoadedModel

# bf16 is chosen when it takes at most this share of fp32's time (margin against noisy shared hosts)
BF16_MAX_RATIO = 0.9
# The calibration volume: large enough for the convolutions' real kernels (and the largest dilation
# of the models here), small enough to measure in about a second per precision.
CALIBRATION_SHAPE = (32, 96, 96)
CACHE_FILE = "precision.json"


def network_key(model: LoadedModel) -> str:
    """What the measurement depends on: this CPU, PyTorch, its threads and the network's layer shapes."""
    layers = [(layer.in_channels, layer.out_channels, layer.kernel_size, layer.dilation, layer.norm, layer.activation)
              for layer in model.spec.layers]
    shape = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:16]
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | layers {shape}"


def auto_precision(model: LoadedModel, device: torch.device, cache_dir: Path | None = None) -> tuple[str, str]:
    """The precision ``auto`` runs ``model`` with on ``device``, and why (one line for the record)."""
    if device.type != "cpu" or not cpu_has_native_bf16():
        precision = resolve_precision("auto", device)[0]
        return precision, f"{precision} on {device.type}" + ("" if device.type != "cpu" else " (no native bf16)")
    path = (cache_dir or default_cache_dir()) / CACHE_FILE
    key = network_key(model)
    known = _read(path)
    entry = known.get(key)
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), float) and entry[k] > 0
                                            for k in ("fp32_s", "bf16_s"))):
        entry = known[key] = measure(model)
        _write(path, known)
    ratio = entry["bf16_s"] / entry["fp32_s"]
    choice = "bf16" if ratio <= BF16_MAX_RATIO else "fp32"
    return choice, f"{choice}: bf16 took {ratio:.2f} of fp32's time for this network on this CPU (measured once)"


def measure(model: LoadedModel) -> dict[str, float]:
    """Seconds per run of each precision on the calibration volume (best of two, alternating)."""
    volume = np.random.default_rng(0).random(CALIBRATION_SHAPE, dtype=np.float32)
    engines = {precision: Engine(model, "cpu", precision) for precision in ("fp32", "bf16")}
    for engine in engines.values():       # first runs build oneDNN's kernels
        engine.run(volume[:8])
    seconds = {precision: float("inf") for precision in engines}
    for _ in range(2):
        for precision, engine in engines.items():
            started = time.perf_counter()
            engine.run(volume)
            seconds[precision] = min(seconds[precision], time.perf_counter() - started)
    return {"fp32_s": round(seconds["fp32"], 4), "bf16_s": round(seconds["bf16"], 4)}


def _read(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write(path: Path, known: dict) -> None:
    """Atomically (:func:`.outputs.atomic_file`); a cache that cannot be written is measured again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial:
            partial.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError:
        pass
