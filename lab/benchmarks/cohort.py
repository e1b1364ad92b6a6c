"""Cohort throughput: scans per hour for `meshnet-lesion segment BIDS_DIR -o DERIV_DIR` on this machine.

Builds a BIDS tree of the real ARC scan (M2265) as N participants (hard links, or copies across
file systems), runs the command once as a user would (one process, the model loaded once, the
default model and options unless given), then runs it again to time the resume check on a finished
study. Prints the machine; writes lab/benchmarks/results/cohort.json (an entry per model).

    .venv/bin/python lab/benchmarks/cohort.py [--scans 4] [--model ID] [-- extra segment options]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "benchmarks")]

from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.registry import Registry  # noqa: E402

RESULTS = ROOT / "lab" / "benchmarks" / "results" / "cohort.json"


def build_study(root: Path, scans: int) -> None:
    source = Registry().fetch_all("sample-arc-m2265-t2w")[0]
    for n in range(1, scans + 1):
        target = root / f"sub-{n:02d}" / "ses-1" / "anat" / f"sub-{n:02d}_ses-1_acq-spc3p2_T2w.nii.gz"
        target.parent.mkdir(parents=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--model")
    parser.add_argument("extra", nargs="*", help="more `segment` options (after --)")
    args = parser.parse_args()
    info = machine()
    print(f"Machine: {describe(info)}")
    with tempfile.TemporaryDirectory() as tmp:
        bids, deriv = Path(tmp) / "bids", Path(tmp) / "deriv"
        build_study(bids, args.scans)
        command = [sys.executable, "-m", "meshnet_lesion.cli", "segment", str(bids), "-o", str(deriv),
                   *(["--model", args.model] if args.model else []), *args.extra]
        runs = {}
        for name in ("study", "rerun"):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            runs[name] = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
            print(f"{name}: {runs[name]:.1f} s  ({done.stderr.strip().splitlines()[-1]})", flush=True)
        sidecars = [json.loads(p.read_text())["meshnet-lesion"] for p in deriv.rglob("*_desc-lesion_mask.json")]
    per_scan = [s["timings_s"]["total"] for s in sidecars]
    result = {"machine": info, "command": " ".join(["python", "lab/benchmarks/cohort.py", *sys.argv[1:]]),
              "scans": args.scans, "model": sidecars[0]["model"], "precision": sidecars[0]["precision"],
              "study_s": round(runs["study"], 1), "rerun_s": round(runs["rerun"], 1),
              "per_scan_s": [round(s, 1) for s in per_scan],
              "scans_per_hour": round(3600 * args.scans / runs["study"], 1)}
    print(f"{args.scans} scans of {result['model']} ({result['precision']}): {result['study_s']} s in one process "
          f"(model loaded once) = {result['scans_per_hour']} scans/hour; per scan "
          f"{min(per_scan):.1f}–{max(per_scan):.1f} s; rerun of the finished study {result['rerun_s']} s")
    merged = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    merged[result["model"]] = result                           # one entry per model measured
    RESULTS.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
