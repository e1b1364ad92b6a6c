"""Work out each lesion model's standardisation landmarks from the reference ARC scan, and write them into the registry.

A model's landmarks are the brain-intensity percentiles of a training scan as that model sees it
(its own grid, normalisation and the MindGrab brain mask): :class:`meshnet_lesion.spec.Standardization`.
The reference is M2265, the one ARC T2w scan here (a training subject of every ARC model in the
registry). Run it again whenever a model's input convention changes; ``--check`` only compares.

    .venv/bin/python lab/training/reference_landmarks.py [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MeshNetLesion"))

from meshnet_lesion import Registry, Segmenter, load_volume  # noqa: E402
from meshnet_lesion.preprocess import brain_percentiles  # noqa: E402
from meshnet_lesion.registry import BUILTIN_REGISTRY, MIRROR_ENV  # noqa: E402

PERCENTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
REFERENCE_SCAN = "sample-arc-m2265-t2w"
# The ARC-trained lesion models, and the entries that share their landmarks (an ensemble's members).
MODELS = ("t2lesion-meshnet11", "brainchop-arc-meshnet11", "arc-meshnet26-r0")
SHARED_WITH = {"arc-meshnet26-r0": ("arc-meshnet26-r1", "arc-meshnet26-r2")}


def landmarks(registry: Registry, model_id: str) -> list[float]:
    volume = load_volume(next(iter(registry.fetch(REFERENCE_SCAN).values())))
    prepared = Segmenter(model_id, registry=registry, device="cpu", brain_mask=True, standardize=False).model_input(volume)
    return [round(float(v), 4) for v in brain_percentiles(prepared.x, prepared.brain, PERCENTILES)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the registry instead of writing")
    args = parser.parse_args()
    os.environ.setdefault(MIRROR_ENV, str(ROOT.parent / "shared" / "data"))
    registry = Registry()
    data = json.loads(BUILTIN_REGISTRY.read_text(encoding="utf-8"))
    entries = {entry["id"]: entry for entry in data["models"]}
    differ = 0
    for model_id in MODELS:
        found = landmarks(registry, model_id)
        for target in (model_id, *SHARED_WITH.get(model_id, ())):
            stored = entries[target].get("spec", {}).get("standardization", {}).get("landmarks")
            print(f"{target:26} {found}  (registry: {stored})")
            differ += stored is None or max(abs(a - b) for a, b in zip(found, stored)) > 1e-3
            entries[target].setdefault("spec", {})["standardization"] = {"percentiles": list(PERCENTILES),
                                                                         "landmarks": found}
    if args.check:
        return 1 if differ else 0
    tmp = BUILTIN_REGISTRY.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(BUILTIN_REGISTRY)
    print(f"wrote {BUILTIN_REGISTRY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
