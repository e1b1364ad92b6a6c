"""The distilled students on the whole grid (as the pipeline runs them) and on tiles (64³: the context of
their training crops): M2265, its mirrored healthy hemisphere and the quality suite's lesion-free renderings.

    .venv/bin/python lab/benchmarks/crop_context.py [--synthetic 2] [--tile 64]
        [--students meshnet16-arc26,meshnet5-arc26]

The students were trained on 64³ crops; their receptive field is 93 voxels, so on the whole grid they see
context they never saw in training. The whole grid is the pipeline's: the brain's box and its margin.
Tiles: as the pipeline lays them (meshnet_lesion.tiles). Lesion mL on the model grid
inside the brain mask (not the source grid: the figures are close to, not equal to, the suite's); on
M2265 also the Dice against the teacher's cached map (> 0.5), which ``make distill-students`` leaves in
lab/training/.work/teacher (computed here if absent). Prints the machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import lesion_free_renderings  # noqa: E402  (sets the path and the mirror)

from meshnet_lesion import Registry, Segmenter, load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.tiles import tile_layout  # noqa: E402
from meshnet_lesion.train import perturb, synth  # noqa: E402
from meshnet_lesion.train.distill import lesion_box, network_input, teacher_view  # noqa: E402
from meshnet_lesion.train.metrics import dice  # noqa: E402
from meshnet_lesion.train.model import MeshNet  # noqa: E402

STUDENTS = ("meshnet16-arc26", "meshnet5-arc26")
TEACHER_CACHE = ROOT / "lab" / "training" / ".work" / "teacher"


def lesion_probability(net: MeshNet, x: torch.Tensor, box: tuple[slice, ...], tile: int | None) -> np.ndarray:
    """The network's lesion probability over ``box`` of ``x`` (1, 1, ...), in one pass or in tiles."""
    out = np.zeros(x.shape[2:], np.float32)
    if tile is None:
        with torch.no_grad():
            out[box] = torch.softmax(net(x[(..., *box)]), 1)[0, 1].numpy()
        return out
    inside = x[(..., *box)]
    for part in tile_layout(inside.shape[2:], tile, [b.start for b in box]):     # as the pipeline lays them
        with torch.no_grad():
            p = torch.softmax(net(inside[(..., *part.window)]), 1)[0, 1].numpy()
        out[box][part.owned] = p[part.own_in_window]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", type=int, default=2, help="renderings of each kind (0: none)")
    parser.add_argument("--tile", type=int, default=64, help="tile edge in voxels (stride: half of it)")
    parser.add_argument("--students", default=",".join(STUDENTS), help="registry ids of MeshNet lesion models")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {describe(machine())}")
    registry = Registry()
    scan = load_volume(next(iter(registry.fetch("sample-arc-m2265-t2w").values())))
    students = args.students.split(",")
    pipeline = Segmenter(students[0], registry=registry, device="cpu")      # the students share its input
    brain = pipeline.segment(scan).brain
    cases = [("M2265", scan), ("mirrored healthy hemisphere", perturb.mirrored_healthy_hemisphere(scan, "L"))]
    if args.synthetic:
        head = synth.build_label_head(Path(os.environ["MESHNET_LESION_MIRROR"]) / "mri" / "t1_crop.nii.gz",
                                      registry, "cpu")
        for kind, volumes in lesion_free_renderings(head, synth.measured_contrast(scan.array, brain),
                                                    args.synthetic).items():
            cases += [(f"{kind} {seed}", volume) for seed, volume in volumes]
    teacher = Segmenter("arc-meshnet26", registry=registry, device="cpu", precision="fp32")
    reference = teacher_view(teacher, scan, TEACHER_CACHE).soft > 0.5
    nets = {name: MeshNet.load(next(iter(registry.fetch(name).values()))).eval() for name in students}
    for case, volume in cases:
        prepared, x = network_input(pipeline, volume)
        inside = prepared.brain
        box = lesion_box(prepared)
        tensor = torch.from_numpy(x)[None, None]
        for name, net in nets.items():
            cells = []
            for tile in (None, args.tile):
                tick = time.perf_counter()
                lesion = (lesion_probability(net, tensor, box, tile) > 0.5) & inside
                agreement = f", Dice vs teacher {dice(lesion, reference & inside):.3f}" if case == "M2265" else ""
                cells.append(f"{'whole grid' if tile is None else f'{tile}³ tiles'} {lesion.sum() / 1000:.2f} mL"
                             f"{agreement} ({time.perf_counter() - tick:.0f} s)")
            print(f"{case:46s} {name:16s} " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
