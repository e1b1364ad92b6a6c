"""The product on another device (a GPU) against this CPU: the same scan segmented here with the models whose
results a run there left in a folder, side by side: lesion mL, the Dice between the two label maps, and each
stage's seconds.

    .venv/bin/python lab/benchmarks/device_parity.py FOLDER [--image sample-arc-m2265-t2w] [--report JSON]

FOLDER holds, for each model ID, what ``meshnet-lesion segment IMAGE --model ID -o FOLDER/ID.nii.gz
--report FOLDER/ID.json --device cuda`` wrote on the other machine (its report names device, precision and
PyTorch). Here each model runs on the CPU with the pipeline's defaults (``auto`` precision). Prints this
machine; the other machine is whatever the reports say, plus what the command that made them printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MeshNetLesion"))

from meshnet_lesion import Registry, Segmenter, load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.train.metrics import dice  # noqa: E402


def compare(folder: Path, image: Path) -> dict:
    scan = load_volume(image)
    rows = {}
    for report_path in sorted(folder.glob("*.json")):
        model_id = report_path.stem
        there = json.loads(report_path.read_text())
        labels_there = load_volume(folder / f"{model_id}.nii.gz").array > 0
        here = Segmenter(model_id, device="cpu").segment(scan)
        ml = here.lesion_volume_ml
        rows[model_id] = {
            "lesion_ml": {"there": there["lesion_volume_ml"], "here": round(ml, 2)},
            "dice_there_vs_here": round(dice(labels_there, here.labels > 0), 4),
            "device": {"there": f"{there['device']} {there['precision']}, PyTorch {there['software']['torch']}",
                       "here": f"{here.device} {here.precision}"},
            "seconds": {"there": there["timings_s"], "here": {k: round(v, 3) for k, v in here.timings_s.items()}},
        }
        print(f"{model_id:18s} {rows[model_id]['lesion_ml']['there']:7.2f} mL there ({rows[model_id]['device']['there']}), "
              f"{ml:7.2f} mL here ({here.device} {here.precision}); Dice {rows[model_id]['dice_there_vs_here']:.4f}; "
              f"network {there['timings_s']['network']:.2f} s there, {here.timings_s['network']:.2f} s here; "
              f"whole pipeline {there['timings_s']['total']:.2f} s there, {here.timings_s['total']:.2f} s here",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--image", default="sample-arc-m2265-t2w", help="a registry sample id or a scan's path")
    parser.add_argument("--report", type=Path, help="write the figures here (JSON)")
    args = parser.parse_args()
    image = Path(args.image) if Path(args.image).is_file() else Registry().fetch_all(args.image)[0]
    info = machine()
    print(f"here: {describe(info)}", flush=True)
    rows = compare(args.folder, image)
    if args.report:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        args.report.write_text(json.dumps({
            "command": "python lab/benchmarks/device_parity.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "commit": commit.stdout.strip(), "machine": info,
            "image": image.name, "models": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
