"""Where a lesion model's false lesion lies on the quality suite's lesion-free renderings.

    .venv/bin/python lab/benchmarks/false_lesion.py [--models arc-meshnet26,arc-meshnet26:one-pass] [--synthetic 2]

The renderings are those of ``lab/benchmarks/quality.py`` (t1_crop's label head; random contrast and M2265's
own, the same seeds), so the lesion mL agree with its table. For each rendering and model: every component
of 0.5 mL or more with its volume, hemisphere, centre (RAS mm on the rendering's grid), median depth under
the surface of the rendered brain, and the rendered tissue classes under it (the anatomy
``synth.anatomy`` draws from the rendering's seed). Prints the machine; writes
lab/benchmarks/results/false_lesion.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import lesion_free_renderings, segmenter_for  # noqa: E402  (sets the path and the mirror)

from meshnet_lesion import Registry, load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.result import place  # noqa: E402
from meshnet_lesion.train import synth  # noqa: E402

RESULTS = ROOT / "lab" / "benchmarks" / "results" / "false_lesion.json"
TISSUE_NAMES = ("background", "CSF", "cortex", "white matter", "deep grey", "pallidum", "cerebellar grey",
                "cerebellar white", "brainstem", "limbic", "head (dark)", "head (middle)", "head (bright)")
MIN_ML = 0.5


def components(labels: np.ndarray, tissues: np.ndarray, affine: np.ndarray) -> list[dict]:
    """The false lesion's components of ``MIN_ML`` or more, largest first (1 mm voxels: 1,000 per mL)."""
    brain = synth.rendered_brain(tissues)
    depth = ndimage.distance_transform_edt(brain)
    found, count = ndimage.label(labels == 1, structure=np.ones((3, 3, 3)))
    rows = []
    for index in range(1, count + 1):
        voxels = found == index
        if voxels.sum() < MIN_ML * 1000:
            continue
        centre, side = place(voxels, affine, brain)
        under = np.bincount(tissues[voxels], minlength=len(TISSUE_NAMES)) / voxels.sum()
        rows.append({"ml": round(voxels.sum() / 1000, 2), "hemisphere": side,
                     "centre_ras_mm": [round(float(c), 1) for c in centre],
                     "median_depth_mm": round(float(np.median(depth[voxels])), 1),
                     "tissues": {TISSUE_NAMES[k]: round(float(f), 3) for k, f in enumerate(under) if f >= 0.01}})
    return sorted(rows, key=lambda row: -row["ml"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="arc-meshnet26")
    parser.add_argument("--synthetic", type=int, default=2, help="renderings of each kind")
    parser.add_argument("--report", type=Path, default=RESULTS)
    args = parser.parse_args()
    registry = Registry()
    shared = Path(os.environ["MESHNET_LESION_MIRROR"])
    info = machine()
    print(f"machine: {describe(info)}")
    scan = load_volume(next(iter(registry.fetch("sample-arc-m2265-t2w").values())))
    segmenters = {name: segmenter_for(name, registry) for name in args.models.split(",")}
    brain = next(iter(segmenters.values())).segment(scan).brain          # M2265's brain, for its contrast
    label_head = synth.build_label_head(shared / "mri" / "t1_crop.nii.gz", registry, "cpu")
    renderings = lesion_free_renderings(label_head, synth.measured_contrast(scan.array, brain), args.synthetic)
    results: dict = {"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "date": time.strftime("%Y-%m-%d"), "renderings": []}
    for kind, volumes in renderings.items():
        for seed, volume in volumes:
            tissues = synth.anatomy(label_head, np.random.default_rng(seed))
            row = {"kind": kind, "seed": seed, "models": {}}
            for name, segmenter in segmenters.items():
                tick = time.perf_counter()
                result = segmenter.segment(volume)
                row["models"][name] = {"lesion_ml": result.lesion_volume_ml, "seconds": time.perf_counter() - tick,
                                       "components": components(result.labels, tissues, volume.affine)}
                print(f"{kind} {seed} {name}: {result.lesion_volume_ml:.1f} mL", flush=True)
                for part in row["models"][name]["components"]:
                    tissue = ", ".join(f"{k} {v:.0%}" for k, v in part["tissues"].items())
                    print(f"    {part['ml']:6.2f} mL {part['hemisphere']:5} at {part['centre_ras_mm']} "
                          f"depth {part['median_depth_mm']} mm: {tissue}", flush=True)
            results["renderings"].append(row)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
