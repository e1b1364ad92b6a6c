"""The brain-extraction network (MindGrab) on a crop of the head against the whole 256³ grid, in one run.

For each real scan here, each crop margin and each precision: time, brain volume and Dice against
MindGrab in fp32 on the whole grid (brainchop's own way), with and without the engine's ``surround``
(background outside the crop, whole-grid GroupNorm statistics). The pipeline's margin
(``pipeline.BRAIN_CROP_MARGIN``) is chosen from this table. Prints the machine; writes
lab/benchmarks/results/brain_mask.json.

    .venv/bin/python lab/benchmarks/brain_mask.py [--margins 32 16 8 4] [--precisions fp32 bf16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "benchmarks")]

from meshnet_lesion import load_volume  # noqa: E402
from meshnet_lesion.devices import cpu_has_native_bf16  # noqa: E402
from meshnet_lesion.engine import Engine  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.pipeline import BRAIN_MODEL_ID, cropped, model_grid  # noqa: E402
from meshnet_lesion.postprocess import brain_region  # noqa: E402
from meshnet_lesion.preprocess import head_box, normalize  # noqa: E402
from meshnet_lesion.registry import Registry  # noqa: E402
from meshnet_lesion.train.metrics import dice  # noqa: E402

SCANS = ("sample-arc-m2265-t2w", "sample-t1-crop")
RESULTS = ROOT / "lab" / "benchmarks" / "results" / "brain_mask.json"


def brain(engine: Engine, grid_array: np.ndarray, normalised: np.ndarray, margin: int | None,
          surround: bool) -> tuple[np.ndarray, float, tuple]:
    box = head_box(grid_array, margin)
    crop, outside = cropped(normalised, box)
    tick = time.perf_counter()
    output = engine.run(crop, surround=outside if surround else 0)
    seconds = time.perf_counter() - tick
    mask = np.zeros(grid_array.shape, bool)
    mask[box] = brain_region(output.labels == 1)
    return mask, seconds, crop.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margins", type=int, nargs="+", default=[32, 16, 8, 4])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        default=["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"])
    args = parser.parse_args()
    registry = Registry()
    model = registry.load(BRAIN_MODEL_ID)
    engines = {precision: Engine(model, "cpu", precision) for precision in args.precisions}
    engine = Engine(model, "cpu", "fp32")
    info = machine()
    print(f"Machine: {describe(info)}")
    rows = []
    for scan in SCANS:
        volume = load_volume(registry.fetch_all(scan)[0])
        grid = model_grid(volume, engine.spec.input, {})
        normalised = normalize(grid.array, engine.spec.normalization)
        reference, seconds, shape = brain(engine, grid.array, normalised, None, False)
        voxel_ml = 0.001  # MindGrab's grid is 1 mm isotropic
        print(f"{scan:22} whole grid {'x'.join(map(str, shape)):>12} {seconds:6.1f} s "
              f"{reference.sum() * voxel_ml:7.1f} mL", flush=True)
        rows.append({"scan": scan, "margin": None, "surround": False, "precision": "fp32", "seconds": seconds,
                     "brain_ml": float(reference.sum() * voxel_ml), "dice": 1.0})
        for margin in args.margins:
            for surround in (False, True):
                for precision, variant in engines.items():
                    mask, seconds, shape = brain(variant, grid.array, normalised, margin, surround)
                    score = dice(mask, reference)
                    rows.append({"scan": scan, "margin": margin, "surround": surround, "precision": precision,
                                 "seconds": seconds, "brain_ml": float(mask.sum() * voxel_ml), "dice": float(score)})
                    print(f"{scan:22} margin {margin:3} {'surround' if surround else 'zeros   '} {precision} "
                          f"{'x'.join(map(str, shape)):>12} {seconds:6.1f} s {mask.sum() * voxel_ml:7.1f} mL "
                          f"Dice vs whole grid {score:.4f}", flush=True)
    RESULTS.write_text(json.dumps({"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                   "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
