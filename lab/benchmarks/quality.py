"""Lesion quality: how each lesion model holds up on the scans people have, measured on the real ARC scan.

    make quality        (= .venv/bin/python lab/benchmarks/quality.py)

Every figure runs the product's own pipeline (``Segmenter``: the model's input convention, brain
mask, standardisation, restriction, back to the source grid). For each model:

- **agreement**: M2265 changed as scanners, sites and tools change it (skull-stripped with its own
  MindGrab mask and cropped; intensities ×0.5 and ×3; gamma 0.7 and 1.4; a smooth ±20 % bias field;
  12-bit integer storage; 1×1×3 mm axial and 2 mm isotropic voxels): lesion mL, and Dice and the mL of
  voxels that changed side against the same model's lesion on the unmodified scan, on the original grid
  (Dice counts the same changed voxels more on a smaller lesion);
- **false positives**: M2265 with its lesioned hemisphere replaced by the mirrored healthy one, and
  lesion-free synthetic renderings (``meshnet_lesion.train.synth``, label head of t1_crop) with a random
  T2-like contrast (as for training) and with M2265's own contrast (``synth.measured_contrast``):
  lesion mL found;
- **synthetic held-out set**: held-out SOOP lesions painted into M2265 (its own lesion, as all models
  together find it, not scored): Dice, AVD and MCC against the painted truth;
- **distilled students**: a student's M2265 lesion Dice against its teacher (the card's
  ``distillation.teacher``) when both are among the models;
- **M2265's volume** beside ARC's MNI-space figure scaled by the brain-volume ratio, the template's
  brain measured by the same MindGrab pipeline on the ICBM152 2009a T1 that nilearn ships;
- ``--part conventions``: each model fed other input conventions than its own (grid, axis order,
  normalisation; no brain mask, no standardisation, as the models' own recipes run): M2265's lesion
  mL and the lesion mL on the lesion-free mirrored-hemisphere scan; and every model on M2265 mirrored
  left to right (its lesion in the right hemisphere, which no ARC scan has).

A model may be named with ``:mirror`` or ``:one-pass`` (e.g. ``arc-meshnet26:one-pass``) to run it
with or without the mirrored pass whatever its card says, so both stand side by side in one run.

It prints a table and writes ``lab/benchmarks/results/quality.json`` (with the machine). M2265 is a training
subject of every ARC model here: these are robustness and agreement checks, not accuracy on unseen scans.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MeshNetLesion"))
os.environ.setdefault("MESHNET_LESION_MIRROR", str(ROOT.parent / "shared" / "data"))

from meshnet_lesion import Registry, Segmenter, Volume, load_volume  # noqa: E402
from meshnet_lesion.machine import describe, machine  # noqa: E402
from meshnet_lesion.train import perturb, synth  # noqa: E402
from meshnet_lesion.train.dataset import IGNORE  # noqa: E402
from meshnet_lesion.train.metrics import average_volume_difference, dice, matthews  # noqa: E402

MODELS = ("arc-meshnet26", "arc-meshnet26-r0", "brainchop-arc-meshnet11", "t2lesion-meshnet11")
WORK = ROOT / "lab" / "benchmarks" / ".work" / "quality"
RESULTS = ROOT / "lab" / "benchmarks" / "results" / "quality.json"
# ARC's own lesion-volume table (neurolabusc/AphasiaRecoveryCohortDemo, merged_artery_participants.tsv).
ARC_M2265_MNI_ML = 100.221
# The MNI template: ICBM152 2009a (symmetric, 1 mm), as packaged in nilearn 0.14.1's wheel (PyPI).
NILEARN_WHEEL = "nilearn==0.14.1"
TEMPLATE = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_SHA256 = "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"
AGREEMENT = ("skull-stripped", "intensity x0.5", "intensity x3", "gamma 0.7", "gamma 1.4", "bias field 20%",
             "12-bit integers", "1x1x3 mm axial", "2 mm isotropic")
LESION_FREE = ("mirrored healthy hemisphere", "synthetic lesion-free", "synthetic lesion-free (M2265 contrast)")


def segmenter_for(name: str, registry: Registry, **options) -> Segmenter:
    """``model-id`` as its card says, ``model-id:mirror`` / ``model-id:one-pass`` with or without the mirrored pass."""
    model_id, _, variant = name.partition(":")
    if variant not in ("", "mirror", "one-pass"):
        raise SystemExit(f"{name}: a model variant is ':mirror' or ':one-pass'")
    mirror = {"": None, "mirror": True, "one-pass": False}[variant]
    return Segmenter(model_id, registry=registry, device="cpu", mirror=mirror, **options)


def agreement_cases(scan: Volume, brain: np.ndarray) -> dict[str, Volume]:
    return {
        "skull-stripped": perturb.skull_stripped(scan, brain),
        "intensity x0.5": perturb.scaled(scan, 0.5),
        "intensity x3": perturb.scaled(scan, 3.0),
        "gamma 0.7": perturb.gamma(scan, 0.7),
        "gamma 1.4": perturb.gamma(scan, 1.4),
        "bias field 20%": perturb.bias_field(scan, 0.2),
        "12-bit integers": perturb.integer_storage(scan, 12),
        "1x1x3 mm axial": perturb.resampled(scan, (1.0, 1.0, 3.0)),
        "2 mm isotropic": perturb.resampled(scan, (2.0, 2.0, 2.0)),
    }


def synthetic_sets(registry: Registry, shared: Path, own_lesion: np.ndarray, scan: Volume, brain: np.ndarray,
                   count: int) -> tuple[dict[str, list[Volume]], list[tuple[Volume, np.ndarray]]]:
    """Lesion-free renderings of the label head (t1_crop), random and with M2265's contrast, and held-out
    SOOP lesions painted into M2265."""
    masks = sorted((shared / "lesions" / "soop").glob("*.nii.gz"))
    _, held_out = synth.split_lesions(masks)
    label_head = synth.build_label_head(shared / "mri" / "t1_crop.nii.gz", registry, "cpu")
    free = {name: [volume for _, volume in renderings]
            for name, renderings in lesion_free_renderings(label_head, synth.measured_contrast(scan.array, brain),
                                                           count).items()}
    real = synth.real_head(scan, brain, own_lesion, "M2265")
    painted = []
    for index in range(count):
        rng = np.random.default_rng([8, index])
        chosen = [synth.LesionSource.load(held_out[i]) for i in rng.choice(len(held_out), 2, replace=False)]
        image, mask, _ = synth.render(real, chosen, rng)
        painted.append((Volume(image, real.affine), mask))
    return free, painted


def lesion_free_renderings(label_head: synth.Head, contrast: np.ndarray,
                           count: int) -> dict[str, list[tuple[list[int], Volume]]]:
    """The suite's lesion-free renderings of the label head, each with its generator's seed: random contrast
    (seeds [7, i]) and M2265's own (seeds [9, i])."""
    renderings: dict[str, list[tuple[list[int], Volume]]] = {name: [] for name in LESION_FREE[1:]}
    for index in range(count):
        for name, first, measured in ((LESION_FREE[1], 7, None), (LESION_FREE[2], 9, contrast)):
            seed = [first, index]
            image, _, _ = synth.render(label_head, [], np.random.default_rng(seed), contrast=measured)
            renderings[name].append((seed, Volume(image, label_head.affine)))
    return renderings


def template_brain_ml(registry: Registry) -> float | None:
    """MindGrab's brain volume on the ICBM152 2009a T1 (from nilearn's wheel, checked by SHA-256)."""
    WORK.mkdir(parents=True, exist_ok=True)
    template = WORK / Path(TEMPLATE).name
    if not template.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WORK),
                               NILEARN_WHEEL], capture_output=True, text=True)
        wheels = sorted(WORK.glob("nilearn-*.whl"))
        if done.returncode != 0 or not wheels:
            print(f"cannot download {NILEARN_WHEEL} for the MNI template: {done.stderr.strip()[-200:]}")
            return None
        template.write_bytes(zipfile.ZipFile(wheels[0]).read(TEMPLATE))
    from meshnet_lesion.registry import sha256_of

    if sha256_of(template) != TEMPLATE_SHA256:
        raise SystemExit(f"{template} does not match its SHA-256")
    labels = Segmenter("brainchop-mindgrab", registry=registry, device="cpu").segment(load_volume(template))
    return float(np.count_nonzero(labels.labels)) * labels.voxel_volume_ml


# Other input conventions than each model's own: (label, registry "spec" override).
CONVENTIONS = {
    "arc-meshnet26-r2": [("its own recipe: zoom to 1 mm, RAS, raw intensities", {}),
                         ("niimath conform (0-255 rescale), RAS", {"input": {"grid": "conform", "orientation": "RAS"}}),
                         ("niimath conform, LIA (as the 11-channel models see it)",
                          {"input": {"grid": "conform", "orientation": "LIA"}})],
    "brainchop-arc-meshnet11": [("min-max", {}), ("2-98 % quantiles (brainchop's config)",
                                                 {"normalization": {"method": "quantile"}})],
    "t2lesion-meshnet11": [("min-max", {}), ("2-98 % quantiles", {"normalization": {"method": "quantile"}})],
}


def conventions(registry: Registry, shared: Path, scan: Volume, models: list[str]) -> dict:
    """Each model with other input conventions (no brain mask, no standardisation), and every model on
    M2265 mirrored left to right."""
    from meshnet_lesion.registry import BUILTIN_REGISTRY

    builtin = {m["id"]: m for m in json.loads(BUILTIN_REGISTRY.read_text(encoding="utf-8"))["models"]}
    entries, labels = [], {}
    for model_id, variants in CONVENTIONS.items():
        for index, (label, override) in enumerate(variants):
            entry = json.loads(json.dumps(builtin[model_id]))
            entry.pop("default", None)
            entry["id"] = f"{model_id}.convention{index}"
            entry["spec"] = {**entry.get("spec", {}), **override}
            entry["spec"].pop("standardization", None)
            entries.append(entry)
            labels[entry["id"]] = (model_id, label)
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "conventions.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries, "samples": []}), encoding="utf-8")
    local = Registry(path, mirror=shared)
    healthy = perturb.mirrored_healthy_hemisphere(scan, "L")
    out: dict = {"conventions": []}
    for entry_id, (model_id, label) in labels.items():
        segmenter = Segmenter(entry_id, registry=local, device="cpu", brain_mask=False, standardize=False,
                              mirror=False)
        row = {"model": model_id, "convention": label, "lesion_ml": segmenter.segment(scan).lesion_volume_ml,
               "lesion_free_ml": segmenter.segment(healthy).lesion_volume_ml}
        out["conventions"].append(row)
        print(f"{model_id:24} {label:56} M2265 {row['lesion_ml']:6.1f} mL, lesion-free scan "
              f"{row['lesion_free_ml']:6.1f} mL", flush=True)
    out["right_hemisphere"] = right_hemisphere(registry, scan, models)
    return out


def right_hemisphere(registry: Registry, scan: Volume, models: list[str]) -> dict:
    """Every model on M2265 mirrored left to right: its lesion in the right hemisphere, which no ARC scan
    (an aphasia cohort) has. Dice: the mirrored result mirrored back against the unmirrored one."""
    out = {}
    flipped = perturb.left_right_flipped(scan)
    for model_id in models:
        segmenter = segmenter_for(model_id, registry)
        original = segmenter.segment(scan).labels == 1
        result = segmenter.segment(flipped)
        back = perturb.left_right_flipped(Volume(result.labels, scan.affine)).array == 1
        out[model_id] = {"lesion_ml": result.lesion_volume_ml,
                         "original_ml": float(original.sum()) * result.voxel_volume_ml, "dice": dice(back, original)}
        print(f"{model_id:24} M2265 mirrored left to right: {result.lesion_volume_ml:6.1f} mL (unmirrored "
              f"{out[model_id]['original_ml']:.1f}), Dice {out[model_id]['dice']:.3f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--synthetic", type=int, default=2, help="volumes in each synthetic set (0: none)")
    parser.add_argument("--part", choices=("robustness", "conventions", "right-hemisphere", "all"), default="all")
    parser.add_argument("--cases", default=",".join(AGREEMENT + LESION_FREE),
                        help="the agreement and lesion-free cases to run (comma-separated; default: all)")
    parser.add_argument("--report", type=Path, default=RESULTS)
    args = parser.parse_args()
    shared = Path(os.environ["MESHNET_LESION_MIRROR"])
    registry = Registry()
    scan = load_volume(next(iter(registry.fetch("sample-arc-m2265-t2w").values())))
    info = machine()
    print(f"machine: {describe(info)}")
    models = args.models.split(",")
    if args.part in ("conventions", "right-hemisphere"):
        part = (conventions(registry, shared, scan, models) if args.part == "conventions" else
                {"right_hemisphere": right_hemisphere(registry, scan, models)})
        results = {"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "date": time.strftime("%Y-%m-%d"), **part}
        report = args.report.with_name(f"{args.report.stem}-{args.part}.json")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
        print(f"wrote {report}")
        return 0
    segmenters = {m: segmenter_for(m, registry) for m in models}
    results: dict = {"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "date": time.strftime("%Y-%m-%d"), "models": {}}

    originals = {}
    for model_id, segmenter in segmenters.items():
        tick = time.perf_counter()
        result = segmenter.segment(scan)
        originals[model_id] = result
        results["models"][model_id] = {"original": {"lesion_ml": result.lesion_volume_ml,
                                                    "brain_ml": result.brain_volume_ml,
                                                    "seconds": time.perf_counter() - tick}}
        print(f"{model_id}: M2265 {result.lesion_volume_ml:.1f} mL ({time.perf_counter() - tick:.0f} s)", flush=True)
    for model_id, segmenter in segmenters.items():        # a distilled student against its teacher
        teacher = segmenter.entry.card.get("distillation", {}).get("teacher")
        if teacher in originals:
            results["models"][model_id]["dice_vs_teacher"] = dice(originals[model_id].labels == 1,
                                                                  originals[teacher].labels == 1)
            print(f"{model_id}: Dice {results['models'][model_id]['dice_vs_teacher']:.3f} against its teacher "
                  f"{teacher} on M2265", flush=True)
    brain = next(iter(originals.values())).brain
    own_lesion = np.logical_or.reduce([r.labels == 1 for r in originals.values()])

    wanted = set(args.cases.split(","))
    if wanted - set(AGREEMENT + LESION_FREE):
        parser.error(f"unknown cases {sorted(wanted - set(AGREEMENT + LESION_FREE))}; known: {AGREEMENT + LESION_FREE}")
    cases = {name: volume for name, volume in agreement_cases(scan, brain).items() if name in wanted}
    lesion_free = {"mirrored healthy hemisphere": [perturb.mirrored_healthy_hemisphere(scan, "L")]}
    painted: list = []
    if args.synthetic:
        free, painted = synthetic_sets(registry, shared, own_lesion, scan, brain, args.synthetic)
        lesion_free.update(free)
    lesion_free = {name: volumes for name, volumes in lesion_free.items() if name in wanted}
    args.report.parent.mkdir(parents=True, exist_ok=True)

    for model_id, segmenter in segmenters.items():
        row = results["models"][model_id]
        reference = originals[model_id].labels == 1
        for name, volume in cases.items():
            tick = time.perf_counter()
            result = segmenter.segment(volume)
            on_original = perturb.onto(result.labels == 1, volume, scan)
            row[name] = {"lesion_ml": result.lesion_volume_ml, "dice": dice(on_original, reference),
                         "changed_ml": float(np.count_nonzero(on_original != reference)) * scan.voxel_volume_ml,
                         "seconds": time.perf_counter() - tick, "standardized": result.standardized}
            print(f"{model_id:24} {name:28} {result.lesion_volume_ml:7.1f} mL  Dice {row[name]['dice']:.3f}  "
                  f"({row[name]['seconds']:.0f} s)", flush=True)
        for name, volumes in lesion_free.items():
            found = [segmenter.segment(v).lesion_volume_ml for v in volumes]
            row[name] = {"false_positive_ml": max(found), "each_ml": found}
            print(f"{model_id:24} {name:28} {max(found):7.2f} mL found (most of {len(found)})", flush=True)
        if painted:
            scores = []
            for volume, mask in painted:
                labels = segmenter.segment(volume).labels == 1
                scored = mask != IGNORE
                truth, predicted = mask == 1, labels & scored
                scores.append({"dice": dice(predicted, truth), "avd": average_volume_difference(predicted, truth),
                               "mcc": matthews(predicted, truth), "true_ml": float(truth.sum()) / 1000,
                               "predicted_ml": float(predicted.sum()) / 1000})
            row["synthetic held-out"] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
            row["synthetic held-out"]["volumes"] = scores
            print(f"{model_id:24} {'synthetic held-out':28} Dice {row['synthetic held-out']['dice']:.3f}  "
                  f"AVD {row['synthetic held-out']['avd']:.3f}  MCC {row['synthetic held-out']['mcc']:.3f}", flush=True)
        # after each model, so that a run stopped part-way keeps what it measured
        args.report.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")

    template_ml = template_brain_ml(registry)
    brain_ml = next(iter(originals.values())).brain_volume_ml
    if template_ml:
        expected = ARC_M2265_MNI_ML * brain_ml / template_ml
        results["arc_table"] = {"mni_ml": ARC_M2265_MNI_ML, "m2265_brain_ml": brain_ml, "template_brain_ml": template_ml,
                                "template": f"ICBM152 2009a T1 ({NILEARN_WHEEL}), MindGrab brain mask",
                                "expected_native_ml": expected}
    if args.part == "all":
        results.update(conventions(registry, shared, scan, models))
    _print_table(results, models)
    args.report.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.report}")
    return 0


def _print_table(results: dict, models: list[str]) -> None:
    print(f"\nLesion quality on the ARC scan M2265 ({describe(results['machine'])})")
    print(f"{'case':40}" + "".join(f"{m:>26}" for m in models))
    row = results["models"]
    print(f"{'M2265 lesion mL':40}" + "".join(f"{row[m]['original']['lesion_ml']:>26.1f}" for m in models))
    if any("dice_vs_teacher" in row[m] for m in models):
        print(f"{'M2265 Dice against its teacher':40}" + "".join(
            f"{row[m]['dice_vs_teacher']:>26.3f}" if "dice_vs_teacher" in row[m] else f"{'':>26}" for m in models))
    for name in [n for n in AGREEMENT if n in row[models[0]]]:
        print(f"{name + ': Dice (mL)':40}" + "".join(
            f"{row[m][name]['dice']:>17.3f} ({row[m][name]['lesion_ml']:5.1f})" for m in models))
    for name in [n for n in AGREEMENT if n in row[models[0]]]:
        print(f"{name + ': mL changed':40}" + "".join(f"{row[m][name]['changed_ml']:>26.2f}" for m in models))
    for name in LESION_FREE:
        if name in row[models[0]]:
            print(f"{name + ': mL':40}" + "".join(f"{row[m][name]['false_positive_ml']:>26.2f}" for m in models))
    if "synthetic held-out" in row[models[0]]:
        print(f"{'synthetic held-out: Dice/AVD/MCC':40}" + "".join(
            f"{row[m]['synthetic held-out']['dice']:>12.3f}/{row[m]['synthetic held-out']['avd']:.3f}/"
            f"{row[m]['synthetic held-out']['mcc']:.3f}" for m in models))
    print(f"{'seconds per run (M2265)':40}" + "".join(f"{row[m]['original']['seconds']:>26.0f}" for m in models))
    table = results.get("arc_table")
    if table:
        print(f"\nARC's table: {table['mni_ml']:.1f} mL in MNI space × brain {table['m2265_brain_ml']:.0f} / "
              f"{table['template_brain_ml']:.0f} mL ({table['template']}) = {table['expected_native_ml']:.1f} mL "
              "expected on M2265's own grid")
        for m in models:
            found = row[m]["original"]["lesion_ml"]
            print(f"  {m:26} {found:6.1f} mL ({(found / table['expected_native_ml'] - 1) * 100:+.0f} %)")


if __name__ == "__main__":
    sys.exit(main())
