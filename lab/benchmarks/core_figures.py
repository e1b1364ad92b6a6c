"""Print the accuracy and parity figures quoted in the README, measured on the real data.

    MESHNET_LESION_MIRROR=../shared/data .venv/bin/python lab/benchmarks/core_figures.py

Takes about 10 minutes on 2 CPU cores (the brain-extraction network dominates).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from meshnet_lesion import Registry, Segmenter, Volume, load_volume, save_volume
from meshnet_lesion.conform import conform
from meshnet_lesion.train.metrics import dice

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def niimath_conform(path: Path, workdir: Path) -> np.ndarray:
    exe = shutil.which("niimath") or str(__import__("niimath").bin_path)
    out = workdir / "c.nii"
    subprocess.run([exe, str(path), "-conform", "-gz", "0", str(out), "-odt", "char"], check=True, capture_output=True)
    return np.asarray(nib.load(out).dataobj)


def oblique(volume: Volume, spacing=(0.9, 0.9, 3.0), shape=(250, 270, 72), angles=(10, -6, 8), order=3) -> Volume:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    centre = volume.affine @ np.r_[np.array(volume.shape) / 2.0, 1.0]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ (np.array(shape) / 2.0)
    m = np.linalg.inv(volume.affine) @ affine
    data = ndimage.affine_transform(volume.array.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape,
                                    order=order)
    return Volume(np.clip(data, 0, None).astype(np.float32), affine)


def main() -> int:
    registry = Registry()
    rows: list[tuple[str, str]] = []
    arc_path = registry.fetch("sample-arc-m2265-t2w")["M2265_T2w.nii.gz"]
    t1_path = registry.fetch("sample-t1-crop")["t1_crop.nii.gz"]
    arc = load_volume(arc_path)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, path in (("M2265_T2w", arc_path), ("t1_crop", t1_path)):
            differ = np.count_nonzero(conform(load_volume(path)).array != niimath_conform(path, tmp))
            rows.append((f"conform vs niimath -conform, {name}: voxels differing", f"{differ} of 16,777,216"))
        for dtype, scale in ((np.int16, 7.0), (np.float32, 0.37)):
            v = oblique(arc, shape=(230, 240, 60), angles=(12, -7, 20), order=1)
            v = Volume((v.array * scale).astype(dtype), v.affine)
            path = save_volume(tmp / "oblique.nii.gz", v.array, v.affine)
            diff = np.abs(conform(load_volume(path)).array.astype(int) - niimath_conform(path, tmp))
            rows.append((f"conform vs niimath, oblique 0.9x0.9x3 mm {np.dtype(dtype).name}: voxels differing "
                         "(max difference)", f"{np.count_nonzero(diff)} ({diff.max()})"))

    t1 = load_volume(t1_path)
    for model_id, ref in (("brainchop-tissue-fast", "tissue_fast"), ("brainchop-subcortical", "subcortical")):
        expected = np.asarray(nib.load(SHARED / "reference" / f"t1_crop.brainchop-0.2.5.{ref}.nii.gz").dataobj)
        got = Segmenter(model_id, registry=registry, device="cpu").segment(t1).labels
        rows.append((f"{model_id} vs brainchop 0.2.5 on t1_crop: voxels differing", f"{np.count_nonzero(got != expected)}"))

    segmenter = Segmenter(registry=registry, device="cpu")
    started = time.perf_counter()
    native = segmenter.segment(arc)
    rows.append(("M2265 default pipeline: lesion volume, components", f"{native.lesion_volume_ml:.2f} mL, "
                 f"{native.lesion_components}"))
    centroid = arc.affine @ np.r_[np.argwhere(native.labels == 1).mean(axis=0), 1]
    rows.append(("M2265 lesion centroid (RAS mm; x < 0 is left)", ", ".join(f"{c:.1f}" for c in centroid[:3])))
    rows.append(("M2265 brain volume (mindgrab mask)", f"{native.brain_volume_ml:.0f} mL"))
    rows.append(("M2265 default pipeline: wall time, CPU", f"{time.perf_counter() - started:.1f} s "
                 f"(brain mask {native.timings_s['brain_mask']:.1f} s, lesion network {native.timings_s['network']:.1f} s)"))

    tilted = oblique(arc)
    result = segmenter.segment(tilted)
    m = np.linalg.inv(tilted.affine) @ arc.affine
    back = ndimage.affine_transform(result.labels, m[:3, :3], m[:3, 3], output_shape=arc.shape, order=0)
    rows.append(("M2265 resampled oblique 0.9x0.9x3 mm (RAS-stored): Dice vs native",
                 f"{dice(back, native.labels, empty=0.0):.3f}"))

    data = arc.array.copy()
    midline = int(np.argwhere(data > 30)[:, 0].mean())
    for i in range(midline + 1, data.shape[0]):
        data[i] = data[2 * midline - i]
    healthy = segmenter.segment(Volume(data, arc.affine))
    rows.append(("M2265 with the lesioned hemisphere replaced by the mirrored healthy one: lesion volume",
                 f"{healthy.lesion_volume_ml:.2f} mL"))

    full = Segmenter(registry=registry, device="cpu", brain_mask=False, crop_margin=None).segment(arc).labels
    for margin in (18, 32):
        cropped = Segmenter(registry=registry, device="cpu", brain_mask=False, crop_margin=margin).segment(arc)
        rows.append((f"crop margin {margin} vs whole 256³ grid (M2265, no brain mask): voxels differing",
                     f"{np.count_nonzero(cropped.labels != full)}"))

    # Axis order: the network must see the conformed array in (i, j, k) order.
    from meshnet_lesion.engine import Engine
    from meshnet_lesion.preprocess import normalize

    engine = Engine(registry.load("t2lesion-meshnet11"), "cpu")
    x = normalize(conform(arc).array, engine.spec.normalization)
    right = engine.run(x).labels
    transposed = engine.run(np.ascontiguousarray(x.transpose(2, 1, 0))).labels.transpose(2, 1, 0)
    rows.append(("M2265 lesion model fed the transposed (k, j, i) array: Dice vs (i, j, k)",
                 f"{dice(transposed == 1, right == 1, empty=0.0):.2f}"))

    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
