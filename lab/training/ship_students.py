"""Ship finished distilled students with the extension: weights into ``meshnet_lesion/weights/``, an entry each
in ``models.json`` (bundled file, SHA-256, size; the teacher's input conventions; an honest card).

    .venv/bin/python lab/training/ship_students.py [--students meshnet16-arc26=meshnet16-arc26-crop96,meshnet5-arc26]
        [--tiled meshnet16-arc26] [--quality JSON]

A student ``ID`` (or ``ID=RUN``: shipped as ID from the run RUN) is finished when its run has written
``lab/training/runs/<RUN>.safetensors`` (the run's last step); where its fine-tuning with renderings has
written ``<RUN>-rendered.safetensors``, that is shipped. A student named in ``--tiled`` runs on tiles of its
training crop (its card's ``"inference": {"tile": crop}``): the context it learnt in. Its card records the
runs (teacher, steps, seconds, the machine that ran them, from the files' own metadata: each session's
machine) and, with ``--quality``, the figures that ``lab/benchmarks/quality.py`` measured for it and for its
teacher in the same run. Rerunning replaces the entries (keeping measured figures it does not produce,
e.g. ``--part right-hemisphere``'s, while the weights are the same); other entries are left as they are.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MeshNetLesion"))

from safetensors import safe_open  # noqa: E402

from meshnet_lesion.machine import describe  # noqa: E402
from meshnet_lesion.registry import BUILTIN_REGISTRY, sha256_of  # noqa: E402
from meshnet_lesion.train.distill import BIAS_FIELD, GAMMA  # noqa: E402

RUNS = ROOT / "lab" / "training" / "runs"
WEIGHTS = BUILTIN_REGISTRY.parent / "weights"
SOOP = ("SOOP lesion masks (Stroke Outcome Optimization Project, OpenNeuro ds004889, CC0; "
        "github.com/neurolabusc/StrokeOutcomeOptimizationProjectDemo)")


def entry(student_id: str, registry: dict,
          run_name: str | None = None, tiled: bool = False) -> dict:
    run_name = run_name or student_id
    source = next(path for path in (RUNS / f"{run_name}-rendered.safetensors", RUNS / f"{run_name}.safetensors")
                  if path.is_file())              # the last stage: fine-tuned with renderings, or distilled only
    with safe_open(str(source), framework="numpy") as handle:
        run = json.loads(handle.metadata()["meshnet_distillation"])
    first = (run.get("initial") or {}).get("run") or run        # the distillation the fine-tuning started from
    for stage in (first, run):
        if "unfinished" in stage:
            raise SystemExit(f"{source.name} comes from an unfinished run ({stage['unfinished']}); finish it first")
    if (first.get("initial") or {}).get("run"):
        raise SystemExit(f"{source.name} was fine-tuned more than once; its card would describe one stage only")
    tuned = run if first is not run else None
    teacher = next(m for m in registry["models"] if m["id"] == run["teacher"])
    member = next(m for m in registry["models"] if m["id"] == teacher.get("members", [teacher["id"]])[0])
    channels = int(run["channels"])
    WEIGHTS.mkdir(exist_ok=True)
    shipped = WEIGHTS / f"{student_id}.safetensors"
    shutil.copyfile(source, shipped)
    hours = sum(r["seconds"] for r in (first, tuned) if r) / 3600
    ran_on = sessions(first) + ("" if tuned is None else f"; then, fine-tuned: {sessions(tuned)}")
    steps = f"{first['steps']} steps" + ("" if tuned is None else f" + {tuned['steps']} " + (
        "with renderings" if tuned.get("renderings") else "of fine-tuning"))
    tuning = "" if tuned is None else fine_tuning(tuned, first)
    card = {
        "id": student_id,
        "title": f"MeshNet-{channels}, distilled from {teacher['title']}",
        "task": "lesion",
        "version": f"distilled from {run['teacher']}, {steps}, {first['crop']}^3 crops",
        "input": teacher["input"],
        "description": (f"The paper's MeshNet-{channels} distilled from {run['teacher']} on augmented M2265 and "
                        "synthetic lesions; not trained on ARC masks. The student learnt the teacher's lesion "
                        "probabilities (temperature "
                        f"{run['temperature']}) on {run['crop']}^3 crops of the ARC scan M2265, degraded as scans "
                        "are (turned, skull-stripped, thick slices, intensities) while the teacher saw the clean "
                        f"scan, with {SOOP.split(' (')[0]} painted into a third of the crops as ground truth."
                        + tuning + ("" if not tiled else
                                    f" It runs on {run['crop']}^3 tiles of the scan overlapping by half, the context "
                                    "it was trained in: on the whole grid at once it calls false lesion where it "
                                    "sees more than it learnt (the mirrored healthy hemisphere of M2265). The "
                                    "tiles lie on a fixed lattice of the 256^3 grid, so that a brain mask a voxel "
                                    "larger or smaller does not move them.")),
        "files": [{"name": shipped.name, "size": shipped.stat().st_size, "sha256": sha256_of(shipped),
                   "bundled": f"weights/{shipped.name}"}],
        "spec": member["spec"],
        "postprocess": teacher["postprocess"],
        **({"inference": {"tile": int(run["crop"])}} if tiled else {}),
        "license": teacher["license"],
        "source": "this extension (lab/training/runs, meshnet-lesion train --teacher)",
        "citation": teacher["citation"],
        "training_data": (f"No lesion masks of ARC. Soft targets of {run['teacher']} on one ARC scan (M2265, "
                          f"OpenNeuro ds004884, CC0) and the training split of {run.get('painted_lesions') or 'no'} {SOOP}; "
                          f"{steps}, {hours:.1f} h of CPU time: {ran_on}."),
        "input_convention": teacher["input_convention"],
        "standardization_note": member.get("standardization_note", ""),
        "metrics": [],
        "metrics_note": ("No held-out ARC evaluation exists for this student: it has never been run on ARC "
                         "subjects other than M2265, which is also a training subject of its teacher. The figures "
                         "below are robustness and agreement checks on M2265, measured."),
        "distillation": {key: first[key] for key in ("teacher", "steps", "crop", "temperature", "weight",
                                                     "painted_lesions", "seconds")} | {"machine": ran_on}
        | ({} if tuned is None else {"fine_tuning": {key: tuned[key] for key in (
            "steps", "renderings", "seconds")} | {key: tuned[key] for key in ("gamma", "bias_field") if key in tuned}
            | {"from": run["initial"]["sha256"]}}),
    }
    return card


def fine_tuning(tuned: dict, first: dict) -> str:
    """The card's sentence on a fine-tuning stage: what it trained on and which augmentation it changed."""
    text = f" Then fine-tuned for {tuned['steps']} steps"
    if tuned.get("renderings"):
        text += (f" with {tuned['renderings']} renderings of a label head (the tissue labels of the T1 t1_crop drawn "
                 "as T2, half lesion-free, half with training-split SOOP lesions; random contrasts and M2265's) making "
                 "half the crops, each rendering's own truth the target there: the teacher calls false lesions on "
                 "such renderings, and the student is not to learn them")
    for key, name, default in (("gamma", "gamma range exp(±G), G =", GAMMA),
                               ("bias_field", "bias field 1 ± B, B =", BIAS_FIELD)):
        if tuned.get(key, default) != first.get(key, default):
            text += f", {name} {tuned[key]} (before {first.get(key, default)})"
    return text + "."


def sessions(run: dict) -> str:
    """Which machine ran which steps of a run, from its record."""
    recorded = [s for s in run.get("sessions", []) if s["steps"]]
    unrecorded = recorded[0]["first_step"] if recorded else run["steps"]
    parts = [f"steps 1-{unrecorded} on a machine not recorded"] if unrecorded else []
    parts += [f"steps {s['first_step'] + 1}-{s['first_step'] + s['steps']} in {_duration(s['seconds'])} "
              f"on {s['machine']}" for s in recorded]
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"   # a GPU session: minutes


def measured(student_id: str, teacher_id: str, quality: dict, report: Path) -> list[dict]:
    """The suite's figures for the student, each beside its teacher's from the same run of
    lab/benchmarks/quality.py, as the items of its card's result file (name, value, source)."""
    rows = quality["models"]
    student, teacher = rows[student_id], rows[teacher_id]
    source = (f"{quality['command']}, {quality.get('date', 'date not recorded')}, "
              f"{describe(quality['machine'])} ({report})")
    items = [("M2265 (ARC sample, a training subject of the teacher): lesion",
              f"{student['original']['lesion_ml']:.1f} mL (teacher {teacher['original']['lesion_ml']:.1f} mL)")]
    if "dice_vs_teacher" in student:
        items.append(("M2265: Dice against the teacher", f"{student['dice_vs_teacher']:.3f}"))
    for case, figures in student.items():
        if not isinstance(figures, dict) or case not in teacher:
            continue
        if "dice" in figures and case != "synthetic held-out":
            items.append((f"M2265 {case}: Dice vs the unmodified result",
                          f"{figures['dice']:.3f} (teacher {teacher[case]['dice']:.3f})"))
        elif "false_positive_ml" in figures:
            items.append((f"{case}{'' if 'lesion-free' in case else ' (lesion-free)'}: lesion found",
                          f"{figures['false_positive_ml']:.2f} mL (teacher {teacher[case]['false_positive_ml']:.2f} mL)"))
    if "synthetic held-out" in student and "synthetic held-out" in teacher:
        held, taught = student["synthetic held-out"], teacher["synthetic held-out"]
        items.append((f"synthetic held-out set ({len(held['volumes'])} volumes): Dice / AVD / MCC",
                      f"{held['dice']:.3f} / {held['avd']:.3f} / {held['mcc']:.3f} "
                      f"(teacher {taught['dice']:.3f} / {taught['avd']:.3f} / {taught['mcc']:.3f})"))
    items.append(("M2265 on the CPU: seconds (preprocessing, brain mask, network)",
                  f"{student['original']['seconds']:.0f} s (teacher {teacher['original']['seconds']:.0f} s)"))
    return [{"name": name, "value": value, "source": source} for name, value in items]


def summary(student_id: str, teacher_id: str, quality: dict) -> str:
    """The card's one line about those figures (the panel and ``models show`` print it)."""
    student, teacher = quality["models"][student_id], quality["models"][teacher_id]
    cases = [case for case, figures in student.items() if isinstance(figures, dict) and "dice" in figures
             and case in teacher and case != "synthetic held-out"]
    kept = sum(round(student[case]["dice"], 3) >= round(teacher[case]["dice"], 3) for case in cases)
    healthy = student.get("mirrored healthy hemisphere", {}).get("false_positive_ml")
    return (f"M2265: {student['original']['lesion_ml']:.1f} mL (teacher {teacher['original']['lesion_ml']:.1f} mL)"
            + (f", Dice {student['dice_vs_teacher']:.3f} against its teacher" if "dice_vs_teacher" in student else "")
            + f"; {kept} of {len(cases)} robustness cases at or above the teacher's"
            + ("" if healthy is None else f"; mirrored healthy hemisphere {healthy:.2f} mL")
            + f"; {student['original']['seconds']:.0f} s on the CPU (teacher {teacher['original']['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", default="meshnet16-arc26,meshnet5-arc26",
                        help="ID or ID=RUN (the run's files in lab/training/runs), comma-separated")
    parser.add_argument("--tiled", default="", help="students that run on tiles of their training crop")
    parser.add_argument("--quality", type=Path, help="lab/benchmarks/quality.py's JSON with the students and teacher")
    args = parser.parse_args()
    registry = json.loads(BUILTIN_REGISTRY.read_text(encoding="utf-8"))
    quality = json.loads(args.quality.read_text(encoding="utf-8")) if args.quality else None
    tiled = set(filter(None, args.tiled.split(",")))
    if tiled - {named.partition("=")[0] for named in args.students.split(",")}:
        parser.error(f"--tiled names students not shipped here: {sorted(tiled)}")
    for named in args.students.split(","):
        student_id, _, run_name = named.partition("=")
        card = entry(student_id, registry, run_name or None, student_id in tiled)
        previous = next((m for m in registry["models"] if m["id"] == student_id), {})
        made = measured(student_id, card["distillation"]["teacher"], quality, args.quality) if quality else []
        results = ROOT / "lab" / "benchmarks" / "results" / "cards" / f"{student_id}.json"
        earlier = json.loads(results.read_text(encoding="utf-8"))["figures"] if results.is_file() else []
        same_weights = [f["sha256"] for f in previous.get("files", [])] == [f["sha256"] for f in card["files"]]
        kept = [item for item in earlier if same_weights     # other benchmarks' figures
                and item["source"] not in {i["source"] for i in made} and item["name"] not in {i["name"] for i in made}]
        if made or kept:
            results.write_text(json.dumps({"model": student_id, "about": "the figures this project measured for the "
                                           "model's card, each with the command, date and machine that measured it",
                                           "figures": made + kept}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            card["measured"] = {"summary": summary(student_id, card["distillation"]["teacher"], quality) if made
                                else previous.get("measured", {}).get("summary", ""),
                                "results": results.relative_to(ROOT).as_posix()}
        models = [m for m in registry["models"] if m["id"] != student_id]
        at = next(i for i, m in enumerate(models) if m["id"] == card["distillation"]["teacher"])
        registry["models"] = models[:at] + [card] + models[at:]
        print(f"{student_id}: {card['files'][0]['bundled']} ({card['files'][0]['size']:,} bytes)")
    BUILTIN_REGISTRY.write_text(json.dumps(registry, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {BUILTIN_REGISTRY}")


if __name__ == "__main__":
    main()
