"""A distilled student against its teacher on M2265, through the product's own pipeline.

Reads the student's weights from its run's state file (finished or not), imports them into a
private registry as a lesion model with the teacher's input conventions, segments M2265 with both
(`auto` precision, brain mask on, as a user would) and prints lesion mL, Dice against the teacher
and times. Issue 17's bars: MeshNet-16 Dice ≥ 0.85, MeshNet-5 ≥ 0.75.

    .venv/bin/python lab/training/runs_check.py lab/training/runs/meshnet16-arc26.state [--teacher arc-meshnet26]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "benchmarks")]

from meshnet_lesion import Segmenter, load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.registry import Registry  # noqa: E402
from meshnet_lesion.train.distill import STATE_METADATA_KEY, student  # noqa: E402
from meshnet_lesion.train.metrics import dice  # noqa: E402
from meshnet_lesion.train.model import MeshNet  # noqa: E402


def student_from_state(path: Path, teacher: Segmenter) -> tuple[MeshNet, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[STATE_METADATA_KEY])
        weights = {name[len("model."):]: handle.get_tensor(name) for name in handle.keys() if name.startswith("model.")}
    model = student(metadata["config"]["train"]["channels"], teacher.spec)
    model.load_state_dict(weights)
    return model.eval(), metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path)
    parser.add_argument("--teacher", default="arc-meshnet26")
    args = parser.parse_args()
    print(f"Machine: {describe(machine())}")
    registry = Registry()
    volume = load_volume(registry.fetch_all("sample-arc-m2265-t2w")[0])
    teacher = Segmenter(args.teacher, registry=registry)
    started = time.perf_counter()
    taught = teacher.segment(volume)
    teacher_s = time.perf_counter() - started
    model, metadata = student_from_state(args.state, teacher)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "student"
        folder.mkdir()
        model.save(folder / "model.safetensors")
        private = Registry(cache_dir=Path(tmp) / "cache")
        private.import_folder(folder, "student", card={"postprocess": teacher.entry.runtime.as_record()["postprocess"]})
        student = Segmenter("student", registry=private)
        started = time.perf_counter()
        result = student.segment(volume)
        student_s = time.perf_counter() - started
    score = dice(result.labels == 1, taught.labels == 1)
    print(f"student MeshNet-{metadata['config']['train']['channels']} after {metadata['step']} of "
          f"{metadata['config']['steps']} steps: {result.lesion_volume_ml:.1f} mL ({student_s:.1f} s); "
          f"teacher {args.teacher} {taught.lesion_volume_ml:.1f} mL ({teacher_s:.1f} s); Dice vs teacher {score:.3f}")


if __name__ == "__main__":
    main()
