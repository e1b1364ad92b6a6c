"""``meshnet-lesion segment``: one scan or several (the model loaded once); a BIDS folder or a manifest goes to
:mod:`.study`. Every output path is checked before anything runs, and all outputs of a scan are published together."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ..errors import Cancelled, InputError, MeshNetLesionError, OutputError
from ..outputs import OutputSet, check_target, check_writable, file_identity, remove_leftovers
from .console import EXIT_BAD_INPUT, error, progress_display, write_json
from .options import build_segmenter, model_options, stem, study_options
from .study import segment_study


def add_parser(commands) -> None:
    seg = commands.add_parser("segment", help="segment one or more scans, a BIDS dataset or a CSV manifest")
    seg.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                     help="NIfTI, NRRD or MGH scan(s); or one BIDS folder; or one CSV with input,output columns")
    seg.add_argument("-o", "--output", required=True, type=Path,
                     help="label map file (one input), an existing folder (several inputs), or the derivatives "
                          "folder (BIDS)")
    model_options(seg)
    seg.add_argument("--probabilities", type=Path, help="also write the probability map (file, or folder in batch)")
    seg.add_argument("--report", type=Path, help="write a JSON report (file, or folder in batch)")
    seg.add_argument("--preview", type=Path, help="write a PNG with the labels outlined (file, or folder in batch)")
    seg.add_argument("-q", "--quiet", action="store_true",
                     help="no progress (bar, stage lines, download messages); the result line stays")
    study = study_options(seg)
    study.add_argument("--shard", metavar="I/N", help="every N-th scan from the I-th (0-based); default: the Slurm "
                       "array task's share when SLURM_ARRAY_TASK_ID/COUNT are set, else all")
    seg.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..volume import load_volume

    if len(args.inputs) == 1 and (args.inputs[0].is_dir() or args.inputs[0].suffix.lower() == ".csv"):
        return segment_study(args)
    if args.participant_label or args.session_label or args.acq or args.probseg or args.shard or args.overwrite:
        raise InputError("--participant-label, --session-label, --acq, --probseg, --shard and --overwrite are for "
                         "a BIDS folder or a CSV manifest")
    plans = _plan(args)
    remove_leftovers({path.parent for plan in plans for role, path in plan.items() if role != "input" and path})
    interactive = sys.stderr.isatty()
    if args.quiet:
        import pooch

        pooch.get_logger().setLevel(logging.WARNING)   # pooch says "Downloading ..." at INFO
    segmenter = build_segmenter(args)
    failures = 0
    for plan in plans:
        try:
            volume = load_volume(plan["input"])
            with progress_display(plan["input"].name, args.quiet, interactive) as show:
                result = segmenter.segment(volume, probabilities=plan["probabilities"] is not None, progress=show)
            _write_outputs(plan, volume, result, segmenter)
        except Cancelled:
            raise
        except MeshNetLesionError as problem:
            failures += 1
            error(f"{plan['input']}: {problem}")
            continue
        summary = (f"{result.lesion_volume_ml:.2f} mL in {result.lesion_components} component(s)"
                   if result.is_lesion_model else f"{len(result.classes) - 1} classes")
        print(f"{plan['input']}: {summary} -> {plan['output']} ({result.timings_s['total']:.1f} s, {result.device})",
              flush=True)
    return EXIT_BAD_INPUT if failures else 0


def _plan(args: argparse.Namespace) -> list[dict[str, Path | None]]:
    """Where each input's outputs go; checked before any computation so bad paths fail fast."""
    batch = len(args.inputs) > 1
    for flag in ("output", "probabilities", "report", "preview"):
        target = getattr(args, flag)
        if target is None:
            continue
        if batch and not target.is_dir():
            raise InputError(f"with several inputs, --{flag} must be an existing folder: {target}")
        if not batch and not target.parent.is_dir():
            raise InputError(f"folder does not exist: {target.parent}")
    if not batch and not re.search(r"\.(nii|nii\.gz|nrrd)$", args.output.name.lower()):
        raise InputError(f"output must end in .nii.gz, .nii or .nrrd: {args.output.name}")
    stems = [stem(p) for p in args.inputs]
    if batch and len(set(stems)) != len(stems):
        raise InputError("several inputs have the same file name; their outputs would collide")

    def place(flag: str, stem: str, suffix: str) -> Path | None:
        target = getattr(args, flag)
        if target is None:
            return None
        return target / f"{stem}{suffix}" if batch else target

    plans = [{"input": path, "output": place("output", stem, "_seg.nii.gz"),
              "probabilities": place("probabilities", stem, "_prob.nii.gz"),
              "report": place("report", stem, "_report.json"), "preview": place("preview", stem, "_preview.png")}
             for path, stem in zip(args.inputs, stems)]
    _refuse_shared_paths(plans)
    for folder in {path.parent for plan in plans for role, path in plan.items() if role != "input" and path}:
        check_writable(folder)
    for plan in plans:
        for role, path in plan.items():
            if role != "input" and path is not None:
                check_target(path, f"--{role}")
    return plans


def _refuse_shared_paths(plans: list[dict[str, Path | None]]) -> None:
    """Two roles on one file (``-o`` = the input, ``--report`` = ``-o``, …) would overwrite one with the other."""
    seen: dict[tuple, str] = {}
    for plan in plans:
        for role, path in plan.items():
            if path is None:
                continue
            key = file_identity(path)
            name = f"the input {path}" if role == "input" else f"--{role} {path}"
            if key in seen:
                raise InputError(f"{seen[key]} and {name} are the same file; nothing was run, nothing was written")
            seen[key] = name


def _write_outputs(plan, volume, result, segmenter) -> None:
    """Write every output of one input as partial files, then publish them together (:class:`.outputs.OutputSet`):
    a failure leaves earlier results as they were and nothing partial behind."""
    from ..volume import save_volume

    written: Path | None = None
    try:
        with OutputSet() as outputs:
            written = plan["output"]
            save_volume(outputs.stage(plan["output"]), result.labels, result.affine, label=True)
            if plan["probabilities"] is not None:
                written = plan["probabilities"]
                probs = result.probabilities
                if probs.ndim == 4:  # (classes, i, j, k) -> (i, j, k, classes) for NIfTI
                    probs = probs.transpose(1, 2, 3, 0)
                save_volume(outputs.stage(plan["probabilities"]), probs.astype("float32"), result.affine)
            if plan["preview"] is not None:
                from ..preview import write_preview

                written = plan["preview"]
                title = (f"{segmenter.entry.id}: lesion {result.lesion_volume_ml:.1f} mL in "
                         f"{result.lesion_components} component(s)" if result.is_lesion_model else segmenter.entry.id)
                write_preview(outputs.stage(plan["preview"]), volume.array, result.labels, result.affine, title)
            if plan["report"] is not None:
                written = plan["report"]
                report = result.report(input=str(plan["input"]), output=str(plan["output"]),
                                       model_title=segmenter.entry.title,
                                       model_load_s=round(segmenter.load_seconds, 3))
                write_json(outputs.stage(plan["report"]), report)
            outputs.commit()
    except OSError as problem:
        raise OutputError(f"cannot write {written}: {problem.strerror or problem}; nothing was written for this "
                          "input and earlier files are as they were") from problem
