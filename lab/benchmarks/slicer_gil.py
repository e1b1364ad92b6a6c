"""The Slicer module's speed as Slicer's main thread lets it run, against the command line, in one run.

Slicer's main thread holds the GIL while its Qt event loop idles (PythonQt's thread support is
off); `headless_slicer.QtMainThread` reproduces that and calls the job's poll from a timer as the
panel does. Printed: the command line's wall time for the same scan and options (process start,
imports, model load, segmentation, writing), the panel's job under the simulated main thread, their
ratio, the longest the timer callback kept the event loop busy (the GUI's worst stall), and how long
a cancel takes to end a run. Every figure comes with the machine.

    .venv/bin/python lab/benchmarks/slicer_gil.py [--model t2lesion-meshnet11] [--brain-mask] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "MeshNetLesion" / "Testing" / "Python"), str(ROOT / "benchmarks")]

from headless_slicer import App, QtMainThread  # noqa: E402

from meshnet_lesion import load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.registry import Registry  # noqa: E402
from MeshNetLesionLib.job import POLL_INTERVAL_MS, WORKER_SLICE_S  # noqa: E402
from MeshNetLesionLib.logic import MeshNetLesionLogic  # noqa: E402

RESULTS = ROOT / "lab" / "benchmarks" / "results" / "slicer_gil.json"


def command_line(scan: Path, model: str, brain_mask: bool, out: Path) -> float:
    """Wall time of `meshnet-lesion segment` for the scan, from process start to exit."""
    command = [sys.executable, "-m", "meshnet_lesion.cli", "segment", str(scan), "-o", str(out / "cli.nii.gz"),
               "--model", model, "--device", "cpu", "-q", "--brain-mask" if brain_mask else "--no-brain-mask"]
    tick = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT / "MeshNetLesion")
    return time.perf_counter() - tick


def panel_run(logic, node, model: str, brain_mask: bool, cancel_after_s: float | None = None) -> dict:
    """One run driven as the panel drives it: a timer that polls, then sleeps WORKER_SLICE_S."""
    main = QtMainThread(POLL_INTERVAL_MS)
    job = logic.segmentAsync(node, modelId=model, device="cpu", brainMask=brain_mask)
    asked = {}

    def on_timer() -> None:
        if cancel_after_s is not None and not asked and time.monotonic() - job.startTime > cancel_after_s:
            asked["at"] = time.perf_counter()
            job.cancel()
        if not job.poll():
            time.sleep(WORKER_SLICE_S)

    seconds = main.run_timer(on_timer, lambda: job.finished)
    record = {"state": job.state, "seconds": seconds, "worst_stall_ms": 1000 * max(main.stalls_s),
              "ticks": len(main.stalls_s)}
    if asked:
        record["cancel_latency_s"] = time.perf_counter() - asked["at"]
    if job.state == "failed":
        raise RuntimeError(f"the job failed: {job.error}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t2lesion-meshnet11")
    parser.add_argument("--brain-mask", action="store_true", help="restrict to the brain (MindGrab runs too)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cancel-after", type=float, default=5.0, help="seconds into the run to press Cancel")
    args = parser.parse_args()

    registry = Registry()
    scan = registry.fetch_all("sample-arc-m2265-t2w")[0]
    volume = load_volume(scan)
    info = machine()
    print(f"Machine: {describe(info)}")
    print(f"Scan: {scan.name} {volume.array.shape}, model {args.model}, brain mask {'on' if args.brain_mask else 'off'}, "
          f"CPU; timer {POLL_INTERVAL_MS} ms, worker slice {WORKER_SLICE_S * 1000:.0f} ms")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        app = App(work)
        logic = MeshNetLesionLogic(app.scene, registry, app.terminologies)
        node = app.add_volume("M2265", volume.array, volume.affine)
        for repeat in range(args.repeats):
            cli = command_line(scan, args.model, args.brain_mask, Path(work))
            panel = panel_run(logic, node, args.model, args.brain_mask)
            rows.append({"cli_s": cli, **panel, "ratio": cli / panel["seconds"]})
            print(f"run {repeat + 1}: command line {cli:6.1f} s | panel under the simulated main thread "
                  f"{panel['seconds']:6.1f} s = {cli / panel['seconds']:.0%} of the command line's speed | "
                  f"worst GUI stall {panel['worst_stall_ms']:.0f} ms over {panel['ticks']} ticks", flush=True)
        cancel = panel_run(logic, node, args.model, args.brain_mask, cancel_after_s=args.cancel_after)
        print(f"cancel pressed {args.cancel_after:.0f} s into a run: finished '{cancel['state']}' "
              f"{cancel['cancel_latency_s']:.2f} s later; worst GUI stall {cancel['worst_stall_ms']:.0f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                   "model": args.model, "brain_mask": args.brain_mask, "runs": rows,
                                   "cancel": cancel}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
