"""``meshnet-lesion``: segment scans and manage models from the command line.

    meshnet-lesion segment T2.nii.gz -o lesion.nii.gz --report report.json
    meshnet-lesion segment sub-*.nii.gz -o results/          # batch: the model is loaded once
    meshnet-lesion segment BIDS_DIR -o DERIV_DIR [--shard 0/4]  # a study: BIDS derivatives, resumable
    meshnet-lesion report DERIV_DIR                           # the cohort's table and QC mosaic
    meshnet-lesion models list | show ID | fetch ID | import FOLDER | remove ID | clear-cache
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ._version import __version__
from .errors import Cancelled, InputError, MeshNetLesionError, OutputError
from .outputs import OutputSet, atomic_file, check_target, check_writable, file_identity, remove_leftovers

EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 2, 130, 143, 141  # 141, 143: as the signal
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mgz", ".mgh", ".img", ".hdr")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every partial file is removed on the way out."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_joined_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread (an embedding program): its own signal handling stays
        previous = None
    try:
        code = args.handler(args)
        sys.stdout.flush()                 # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # the reader went away (`meshnet-lesion models list | head -3`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Terminated:
        _error("terminated")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _error("cancelled")
        return EXIT_CANCELLED
    except Cancelled as error:
        _error(str(error))
        return EXIT_CANCELLED
    except MeshNetLesionError as error:
        _error(str(error))
        return EXIT_BAD_INPUT
    except ImportError as error:
        if "torch" not in f"{error.name} {error}":
            raise
        _error(f"PyTorch could not be loaded ({error}). If a memory limit is set (ulimit -v), it is too low for "
               "PyTorch: raise it or remove it")
        return EXIT_BAD_INPUT
    except OSError as error:   # the file system said no where no check of ours did: one line, not a traceback
        where = f": {error.filename}" if error.filename else ""
        _error(f"{error.strerror or error}{where}")
        return EXIT_BAD_INPUT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _joined_values(argv: list[str]) -> list[str]:
    """``--shard -1/2`` as ``--shard=-1/2``: argparse takes a value that starts with "-" for an option and says
    only "expected one argument"; joined, the value reaches the check that says what is wrong with it."""
    joined = []
    for token in argv:
        if joined and joined[-1] == "--shard" and token.startswith("-") and token not in ("-h", "--help"):
            joined[-1] = f"--shard={token}"
        else:
            joined.append(token)
    return joined


def _error(message: str) -> None:
    print(f"meshnet-lesion: error: {message}", file=sys.stderr)


DESCRIPTION = ("Segment chronic stroke lesions on T2-weighted MRI with MeshNet, and manage its models. "
               "Research software: not for clinical use.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnet-lesion", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment one or more scans, a BIDS dataset or a CSV manifest")
    seg.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                     help="NIfTI, NRRD or MGH scan(s); or one BIDS folder; or one CSV with input,output columns")
    seg.add_argument("-o", "--output", required=True, type=Path,
                     help="label map file (one input), an existing folder (several inputs), or the derivatives "
                          "folder (BIDS)")
    _model_options(seg)
    seg.add_argument("--probabilities", type=Path, help="also write the probability map (file, or folder in batch)")
    seg.add_argument("--report", type=Path, help="write a JSON report (file, or folder in batch)")
    seg.add_argument("--preview", type=Path, help="write a PNG with the labels outlined (file, or folder in batch)")
    seg.add_argument("-q", "--quiet", action="store_true",
                     help="no progress (bar, stage lines, download messages); the result line stays")
    study = _study_options(seg)
    study.add_argument("--shard", metavar="I/N", help="every N-th scan from the I-th (0-based); default: the Slurm "
                       "array task's share when SLURM_ARRAY_TASK_ID/COUNT are set, else all")
    seg.set_defaults(handler=_segment)

    submitter = commands.add_parser("submit", help="a BIDS study as a Slurm job array (submitit; --local runs "
                                    "the same jobs on this machine)")
    submitter.add_argument("bids", type=Path, metavar="BIDS_DIR")
    submitter.add_argument("-o", "--output", required=True, type=Path, help="the derivatives folder")
    _model_options(submitter)
    _study_options(submitter)
    cluster = submitter.add_argument_group("the job array")
    cluster.add_argument("--slurm-partition", help="Slurm partition (required unless --local)")
    cluster.add_argument("--array-parallelism", type=int, default=16, help="array tasks running at once")
    cluster.add_argument("--scans-per-task", type=int, default=10,
                         help="scans per array task (each task loads the model once)")
    cluster.add_argument("--gpus-per-task", type=int, default=0)
    cluster.add_argument("--cpus-per-task", type=int, default=4)
    cluster.add_argument("--mem-gb", type=int, default=12)
    cluster.add_argument("--timeout-min", type=int, default=240)
    cluster.add_argument("--local", action="store_true", help="submitit's local executor: the jobs run here")
    cluster.add_argument("--wait", action="store_true", help="wait for the jobs and report how they ended")
    submitter.set_defaults(handler=_submit)

    reporter = commands.add_parser("report", help="a study's table (TSV) and QC mosaic from its derivatives")
    reporter.add_argument("derivatives", type=Path, help="the folder `segment BIDS_DIR -o` wrote")
    reporter.add_argument("--tsv", type=Path, help="default: DERIVATIVES/lesions.tsv")
    reporter.add_argument("--mosaic", type=Path, help="default: DERIVATIVES/lesions_mosaic.png")
    reporter.set_defaults(handler=_report)

    models = commands.add_parser("models", help="list, fetch, import or remove models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="models and sample scans, and whether they are on this machine")
    listing.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    listing.set_defaults(handler=_models_list)
    show = actions.add_parser("show", help="print a model card")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="the registry entry as JSON")
    show.set_defaults(handler=_models_show)
    fetch = actions.add_parser("fetch", help="make sure an entry's files are on this machine; print their paths")
    fetch.add_argument("ids", nargs="+", metavar="ID")
    fetch.set_defaults(handler=_models_fetch)
    importer = actions.add_parser("import", help="import a local model folder (brainchop, TensorFlow.js or ours)")
    importer.add_argument("folder", type=Path)
    importer.add_argument("--id", dest="entry_id")
    importer.add_argument("--title")
    importer.add_argument("--task", default="lesion")
    importer.add_argument("--tile", type=int, metavar="EDGE",
                          help="run it on EDGE³ tiles overlapping by half (≥ 16), e.g. a student distilled on "
                               "crops of that edge, which calls false lesion on context it never saw")
    importer.set_defaults(handler=_models_import)
    remove = actions.add_parser("remove", help="remove an imported model or a model's downloaded files")
    remove.add_argument("id")
    remove.set_defaults(handler=_models_remove)
    clear = actions.add_parser("clear-cache", help="delete all downloaded files (imported models stay)")
    clear.set_defaults(handler=_models_clear)

    evaluate = commands.add_parser("evaluate", help="score models on image,mask pairs (Dice, AVD, MCC; paired tests)")
    evaluate.add_argument("pairs", type=Path, help="CSV with image,mask rows, or an ARC-like BIDS folder")
    evaluate.add_argument("--model", dest="models", action="append", help="registry id (repeat to compare models)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-brain-mask", dest="brain_mask", action="store_false", default=None)
    evaluate.add_argument("--report", type=Path, help="write per-subject scores and the tests as JSON")
    evaluate.set_defaults(handler=_evaluate)

    trainer = commands.add_parser("train", help="train a MeshNet lesion model (the paper's recipe by default); "
                                  "several GPUs: torchrun --nproc-per-node N -m meshnet_lesion.cli train ...")
    trainer.add_argument("pairs", type=Path,
                         help="CSV with image,mask rows, or an ARC-like BIDS folder (SPACE T2w only)")
    trainer.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    trainer.add_argument("--validation", type=Path, help="validation pairs, CSV or BIDS (the best restart is kept)")
    trainer.add_argument("--channels", type=int, default=16)
    trainer.add_argument("--epochs", type=int, default=50)
    trainer.add_argument("--restarts", type=int, default=1, help="independent runs; the paper used 10")
    trainer.add_argument("--lr", type=float, default=1e-3)
    trainer.add_argument("--background-weight", type=float, default=0.5, help="class weight of background (lesion: 1)")
    trainer.add_argument("--crop", type=int, help="train on random crops of this edge (e.g. 128 on a CPU)")
    trainer.add_argument("--lesion-crops", type=float, default=0.5,
                         help="share of crops centred on a lesion voxel (the rest anywhere)")
    trainer.add_argument("--device", default="auto")
    trainer.add_argument("--seed", type=int, default=0)
    teaching = trainer.add_argument_group("distillation (--teacher): PAIRS may also be T2w images, no masks needed")
    teaching.add_argument("--teacher", help="a registry model or ensemble whose soft targets the student learns")
    teaching.add_argument("--temperature", type=float, default=2.0)
    teaching.add_argument("--distill-weight", type=float, default=0.7,
                          help="the teacher term's share of the loss where a ground truth exists")
    teaching.add_argument("--steps", type=int, default=2000, help="training steps (one crop each)")
    teaching.add_argument("--state", type=Path, help="the run's state file: written every --save-every steps; "
                          "the same command continues from it (default: OUTPUT with .state)")
    teaching.add_argument("--save-every", type=int, default=50)
    teaching.add_argument("--session-steps", type=int, help="stop after this many steps of this call (resume later)")
    teaching.add_argument("--unfinished", action="store_true", help="write OUTPUT also when this call stops short "
                          "of --steps: the student so far, to check a run halfway (its metadata says so; "
                          "ship_students refuses it); with --session-steps 0 it trains nothing")
    teaching.add_argument("--teacher-cache", type=Path, help="where the teacher's maps are kept (default: beside "
                          "the state file)")
    teaching.add_argument("--lesions", type=Path, help="a folder of lesion masks in MNI space (e.g. SOOP's) painted "
                          "into a third of the crops as ground truth; its training split only (synth.split_lesions)")
    teaching.add_argument("--gamma", type=float, default=0.3, help="the student's intensities (normalised to [0, 1]) "
                          "are raised to a power between exp(-GAMMA) and exp(GAMMA); the teacher sees them unchanged")
    teaching.add_argument("--bias-field", type=float, default=0.15, help="and multiplied by a smooth random field "
                          "between 1 - BIAS_FIELD and 1 + BIAS_FIELD")
    teaching.add_argument("--init", type=Path, help="fine-tune this distilled student (.safetensors) instead of "
                          "starting a new one")
    teaching.add_argument("--label-head", type=Path, help="a T1 whose tissue labels are rendered as T2-like heads "
                          "(synth; e.g. ../shared/data/mri/t1_crop.nii.gz): half the crops come from --renderings of "
                          "it, their own truth the target")
    teaching.add_argument("--renderings", type=int, default=8, help="with --label-head: how many (half lesion-free, "
                          "half with --lesions; half of each with the first image's contrast)")
    teaching.add_argument("--workers", type=int, default=0, help="prepare the samples in this many forked processes "
                          "ahead of the step (the same samples): for a GPU, whose step outruns one core's augmentation")
    trainer.set_defaults(handler=_train)

    tuner = commands.add_parser("tune", help="hyperparameter search (Optuna TPE + asynchronous successive halving)")
    tuner.add_argument("pairs", type=Path, help="training pairs, CSV or BIDS")
    tuner.add_argument("--validation", type=Path, required=True, help="validation pairs, CSV or BIDS")
    tuner.add_argument("--trials", type=int, default=20)
    tuner.add_argument("--min-epochs", type=int, default=15, help="first rung of successive halving")
    tuner.add_argument("--max-epochs", type=int, default=50)
    tuner.add_argument("--crop", type=int, help="train on random crops of this edge")
    tuner.add_argument("--lesion-crops", type=float, default=0.5, help="share of crops centred on a lesion voxel")
    tuner.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///study.db (resumable, shareable)")
    tuner.add_argument("--study", default="meshnet-lesion", help="study name in the storage")
    tuner.add_argument("--device", default="auto")
    tuner.add_argument("--seed", type=int, default=0)
    tuner.add_argument("--report", type=Path, help="write every trial and the best parameters as JSON")
    tuner.set_defaults(handler=_tune)

    synth = commands.add_parser("synth", help="render synthetic chronic-lesion T2w volumes from real lesion masks")
    synth.add_argument("output", type=Path, help="folder for the volumes, their masks, pairs.csv and synth.json")
    synth.add_argument("--lesions", type=Path, required=True, help="folder of binary lesion masks in MNI space")
    synth.add_argument("--split", choices=("train", "test", "all"), default="train",
                       help="which lesion masks: the training 90 %%, the held-out 10 %% (by file-name hash), or all")
    anatomy = synth.add_mutually_exclusive_group(required=True)
    anatomy.add_argument("--t1", type=Path, help="T1w scan whose label map is rendered with random T2 contrasts")
    anatomy.add_argument("--t2", type=Path, help="real T2w scan to paint lesions into (its own lesion is excluded)")
    synth.add_argument("--count", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--lesion-free", action="store_true", help="render the anatomy without lesions")
    synth.add_argument("--workers", type=int, default=1)
    synth.add_argument("--device", default="auto", help="for the models that label the anatomy")
    synth.set_defaults(handler=_synth)
    return parser


# ----------------------------------------------------------------------------- segment

def _stem(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


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
    stems = [_stem(p) for p in args.inputs]
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



def _model_options(parser: argparse.ArgumentParser) -> None:
    """The model and how it runs (``segment`` and ``submit``)."""
    parser.add_argument("--model", default=None, help="registry id (default: the registry's default lesion model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto = fp16 on CUDA; on a CPU with native bf16, bf16 for each network it measures "
                             "faster (once per CPU, remembered in the cache), else fp32")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--no-brain-mask", dest="brain_mask", action="store_false", default=None,
                      help="skip brain extraction: lesions are not restricted to the brain and intensities are "
                           "not standardised (both on by default for lesion models)")
    mask.add_argument("--brain-mask", dest="brain_mask", action="store_true", help="restrict labels to the brain")
    parser.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                        help="feed the model its normalised scan as it is, without mapping the brain's intensities "
                             "onto the model's reference landmarks")
    mirror = parser.add_mutually_exclusive_group()
    mirror.add_argument("--mirror", dest="mirror", action="store_true", default=None,
                        help="also run the lesion model on the scan mirrored left to right and keep a lesion either "
                             "pass finds (twice the network time; on by default for the ARC-trained models, which "
                             "miss right-hemisphere lesions without it)")
    mirror.add_argument("--no-mirror", dest="mirror", action="store_false", help="one pass, as the model was trained")
    parser.add_argument("--min-lesion-ml", type=float, default=0.0, help="drop lesion components smaller than this")
    parser.add_argument("--no-crop", action="store_true", help="run on the whole 256³ grid instead of the head box")


def _study_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Which scans of a study and which outputs (``segment`` on a BIDS folder, and ``submit``)."""
    study = parser.add_argument_group("a study (BIDS folder or CSV manifest)")
    study.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL", help="only these subjects")
    study.add_argument("--session-label", nargs="+", default=[], metavar="LABEL", help="only these sessions")
    study.add_argument("--acq", nargs="+", default=[], metavar="LABEL",
                       help="only these T2w acquisitions (default: all, but a session's 3D SPACE T2w rather than "
                            "its others, e.g. ARC's spc3p2 rather than tse3)")
    study.add_argument("--probseg", action="store_true", help="also write *_desc-lesion_probseg.nii.gz")
    study.add_argument("--overwrite", action="store_true", help="segment again scans whose outputs are current")
    return study


def _segment(args: argparse.Namespace) -> int:
    from .volume import load_volume

    if len(args.inputs) == 1 and (args.inputs[0].is_dir() or args.inputs[0].suffix.lower() == ".csv"):
        return _segment_study(args)
    if args.participant_label or args.session_label or args.acq or args.probseg or args.shard or args.overwrite:
        raise InputError("--participant-label, --session-label, --acq, --probseg, --shard and --overwrite are for "
                         "a BIDS folder or a CSV manifest")
    plans = _plan(args)
    remove_leftovers({path.parent for plan in plans for role, path in plan.items() if role != "input" and path})
    interactive = sys.stderr.isatty()
    if args.quiet:
        import pooch

        pooch.get_logger().setLevel(logging.WARNING)   # pooch says "Downloading ..." at INFO
    segmenter = _segmenter(args)
    failures = 0
    for plan in plans:
        try:
            volume = load_volume(plan["input"])
            with _progress_display(plan["input"].name, args.quiet, interactive) as show:
                result = segmenter.segment(volume, probabilities=plan["probabilities"] is not None, progress=show)
            _write_outputs(plan, volume, result, segmenter)
        except Cancelled:
            raise
        except MeshNetLesionError as error:
            failures += 1
            _error(f"{plan['input']}: {error}")
            continue
        summary = (f"{result.lesion_volume_ml:.2f} mL in {result.lesion_components} component(s)"
                   if result.is_lesion_model else f"{len(result.classes) - 1} classes")
        print(f"{plan['input']}: {summary} -> {plan['output']} ({result.timings_s['total']:.1f} s, {result.device})",
              flush=True)
    return EXIT_BAD_INPUT if failures else 0


def _segmenter(args: argparse.Namespace):
    """The Segmenter the model options ask for (loaded once per command)."""
    from .pipeline import Segmenter

    return Segmenter(args.model, device=args.device, precision=args.precision, brain_mask=args.brain_mask,
                     standardize=args.standardize, min_lesion_ml=args.min_lesion_ml, mirror=args.mirror,
                     crop_margin=None if args.no_crop else "auto",
                     download_progress=None if args.quiet else _download_printer())


def _segment_study(args: argparse.Namespace) -> int:
    """A BIDS dataset or manifest: every scan as an idempotent job (:mod:`.cohort`), the model loaded once."""
    from . import cohort

    source = args.inputs[0]
    if any(getattr(args, flag) is not None for flag in ("probabilities", "report", "preview")):
        raise InputError("with a BIDS folder or manifest, outputs follow the derivatives layout: use --probseg "
                         "instead of --probabilities; sidecars and previews are always written")
    if source.is_dir():
        output, dataset = args.output.resolve(), source.resolve()
        if output == dataset or (dataset in output.parents and (dataset / "derivatives") not in output.parents):
            raise InputError("the derivatives folder must be outside the dataset or inside its derivatives/ "
                             "(e.g. BIDS_DIR/derivatives/meshnet-lesion); the raw data is never written to")
        found = cohort.find_bids(source, args.output, args.participant_label, args.session_label, args.acq)
    else:
        found = cohort.read_manifest(source)
    scans = cohort.shard_of(found.scans, args.shard)
    if not found.scans:
        raise InputError(f"{source}: no T2w image matches (sub-*/[ses-*/]anat/*_T2w.nii[.gz] and the filters)")
    cohort.check_outputs(found.scans, args.probseg)   # all of them, whichever shard: before the model loads
    cohort.dataset_description(args.output, source if source.is_dir() else None)
    for image, reason in found.skipped:
        _error_free_note(f"skipped {image}: {reason}", args.quiet)
    if args.quiet:
        import pooch

        pooch.get_logger().setLevel(logging.WARNING)
    segmenter = _segmenter(args)
    options = {"brain_mask": args.brain_mask, "standardize": args.standardize, "min_lesion_ml": args.min_lesion_ml,
               "mirror": segmenter.mirror, "crop": not args.no_crop, "precision": args.precision}
    runner = cohort.Cohort(segmenter, args.output, options, probseg=args.probseg, overwrite=args.overwrite)
    tally = runner.run(scans, _StudyProgress(sys.stderr.isatty(), args.quiet))
    busy = f", {tally.busy} being segmented by another run" if tally.busy else ""
    print(f"{tally.total} scan(s): {tally.done} segmented, {tally.skipped} already current{busy}, {tally.failed} failed"
          + (f" (see {args.output / 'logs' / 'failed'})" if tally.failed else ""), file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT if tally.failed else 0


def _error_free_note(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"meshnet-lesion: {message}", file=sys.stderr)


class _StudyProgress:
    """One line per scan: for people on a terminal (done / failed / left, ETA), else JSON for machines."""

    def __init__(self, interactive: bool, quiet: bool) -> None:
        self.interactive, self.quiet = interactive, quiet

    def __call__(self, status: str, scan, tally, details: dict) -> None:
        from .cohort import describe_eta

        if self.interactive and not self.quiet:
            figure = (f": {details['lesion_volume_ml']:.1f} mL" if status == "done"
                      else f": {details['error']}" if status == "failed"
                      else f": being segmented by {details['locked_by']}" if status == "busy" else "")
            print(f"[{tally.done + tally.skipped + tally.failed + tally.busy}/{tally.total}] {status} {scan.label}"
                  f"{figure} · "
                  f"{tally.failed} failed, {tally.left} left, {describe_eta(tally.eta())}", file=sys.stderr,
                  flush=True)
        elif not self.interactive:
            record = {"status": status, "input": str(scan.source), "output": str(scan.mask),
                      "done": tally.done, "skipped": tally.skipped, "failed": tally.failed, "busy": tally.busy,
                      "left": tally.left}
            if "locked_by" in details:
                record["locked_by"] = details["locked_by"]
            if "lesion_volume_ml" in details:
                record["lesion_volume_ml"] = details["lesion_volume_ml"]
            if "error" in details:
                record["error"] = details["error"]
            print(json.dumps(record), flush=True)


def _submit(args: argparse.Namespace) -> int:
    from . import cohort, submit

    if not args.local and not args.slurm_partition:
        raise InputError("submit needs --slurm-partition (or --local to run the jobs on this machine)")
    if args.scans_per_task < 1 or args.array_parallelism < 1:
        raise InputError("--scans-per-task and --array-parallelism must be at least 1")
    scans = cohort.find_bids(args.bids, args.output, args.participant_label, args.session_label, args.acq).scans
    if not scans:
        raise InputError(f"{args.bids}: no T2w image matches the filters")
    argv = ["segment", str(args.bids.resolve()), "-o", str(args.output.resolve()), "--device", args.device,
            "--precision", args.precision, "--min-lesion-ml", str(args.min_lesion_ml)]
    argv += ["--model", args.model] if args.model else []
    argv += [] if args.brain_mask is None else ["--brain-mask" if args.brain_mask else "--no-brain-mask"]
    argv += ["--no-standardize"] if args.standardize is False else []
    argv += [] if args.mirror is None else ["--mirror" if args.mirror else "--no-mirror"]
    argv += ["--no-crop"] if args.no_crop else []
    for flag, values in (("--participant-label", args.participant_label), ("--session-label", args.session_label),
                         ("--acq", args.acq)):
        argv += [flag, *values] if values else []
    argv += [flag for flag, on in (("--probseg", args.probseg), ("--overwrite", args.overwrite)) if on]
    tasks = -(-len(scans) // args.scans_per_task)
    cohort.dataset_description(args.output, args.bids)
    jobs = submit.submit_array(main, argv, tasks, args.output / "logs" / "submitit", local=args.local,
                               partition=args.slurm_partition, parallelism=args.array_parallelism,
                               gpus=args.gpus_per_task, cpus=args.cpus_per_task, mem_gb=args.mem_gb,
                               timeout_min=args.timeout_min)
    print(f"submitted {tasks} task(s) for {len(scans)} scan(s): job {jobs[0].job_id.split('_')[0]} "
          f"(logs in {args.output / 'logs' / 'submitit'})", flush=True)
    if not args.wait:
        return 0
    codes = [job.result() for job in jobs]
    print(f"{codes.count(0)} of {tasks} task(s) ended cleanly" + (
        "; run `meshnet-lesion report` for the failed scans" if any(codes) else ""), flush=True)
    return EXIT_BAD_INPUT if any(codes) else 0


def _report(args: argparse.Namespace) -> int:
    from .cohort_report import collect, summary_lines, write_mosaic, write_tsv

    tsv_path, mosaic_path = args.tsv or args.derivatives / "lesions.tsv", args.mosaic or args.derivatives / "lesions_mosaic.png"
    for role, path in (("--tsv", tsv_path), ("--mosaic", mosaic_path)):
        check_target(path, role)
    rows = collect(args.derivatives)
    tsv = write_tsv(rows, tsv_path)
    mosaic = write_mosaic(rows, args.derivatives, mosaic_path)
    for line in summary_lines(rows):
        print(line)
    print(f"wrote {tsv}" + (f" and {mosaic}" if mosaic else ""))
    damaged = [row for row in rows if row["status"] == "damaged"]
    if damaged:   # a label map changed after it was written: the table lists it, and the exit status says so
        _error(f"{len(damaged)} scan(s) have outputs that changed since they were written; run `segment` again")
    return EXIT_BAD_INPUT if damaged else 0


def _write_outputs(plan, volume, result, segmenter) -> None:
    """Write every output of one input as partial files, then publish them together (:class:`.outputs.OutputSet`):
    a failure leaves earlier results as they were and nothing partial behind."""
    from .volume import save_volume

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
                from .preview import write_preview

                written = plan["preview"]
                title = (f"{segmenter.entry.id}: lesion {result.lesion_volume_ml:.1f} mL in "
                         f"{result.lesion_components} component(s)" if result.is_lesion_model else segmenter.entry.id)
                write_preview(outputs.stage(plan["preview"]), volume.array, result.labels, result.affine, title)
            if plan["report"] is not None:
                written = plan["report"]
                report = result.report(input=str(plan["input"]), output=str(plan["output"]),
                                       model_title=segmenter.entry.title,
                                       model_load_s=round(segmenter.load_seconds, 3))
                _write_json(outputs.stage(plan["report"]), report)
            outputs.commit()
    except OSError as error:
        raise OutputError(f"cannot write {written}: {error.strerror or error}; nothing was written for this "
                          "input and earlier files are as they were") from error


def _write_json(path: Path, data) -> Path:
    """JSON written as a partial file beside ``path``, then renamed (atomic, ordinary permissions)."""
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def _progress_display(name: str, quiet: bool, interactive: bool):
    """A progress bar on a terminal, one line per stage elsewhere (logs, ``make``), nothing with ``-q``."""
    if quiet:
        yield None
    elif interactive:
        with _ProgressBar(name) as bar:
            yield bar
    else:
        yield _StageLines(name)


class _StageLines:
    """Prints ``name: stage`` to stderr whenever the stage (the text before its first ':') changes."""

    def __init__(self, name: str) -> None:
        self.name, self.last = name, None

    def __call__(self, fraction: float, stage: str) -> None:
        head = stage.split(":")[0]
        if head != self.last:
            self.last = head
            print(f"{self.name}: {head} ({fraction:.0%})", file=sys.stderr, flush=True)


class _ProgressBar:
    def __init__(self, name: str) -> None:
        self.name, self.bar = name, None

    def __enter__(self) -> _ProgressBar:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=self.name, unit="", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                        "{elapsed}<{remaining} {postfix}", file=sys.stderr, leave=False)
        return self

    def __call__(self, fraction: float, stage: str) -> None:
        if self.bar is not None:
            self.bar.update(int(fraction * 1000) - self.bar.n)
            self.bar.set_postfix_str(stage, refresh=False)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _download_printer():
    def report(done: int, total: int, name: str) -> None:
        if total and done >= total:
            print(f"downloaded {name} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return report


# ----------------------------------------------------------------------------- models

def _registry():
    from .registry import Registry

    return Registry()


def _models_list(args: argparse.Namespace) -> int:
    from .registry import entries_json

    registry = _registry()
    entries = registry.entries()
    if args.json:
        print(json.dumps(entries_json(entries), indent=1))
        return 0
    default = registry.default_model().id
    print(f"  {'ID':<26} {'KIND':<6} {'TASK':<17} {'SOURCE':<8} {'FILES':<18} TITLE")
    for entry in entries:
        try:
            state = "here" if registry.is_available(entry) else f"download {registry.download_size(entry) / 1e6:.1f} MB"
        except MeshNetLesionError as error:       # one damaged entry must not hide the others
            state = f"damaged: {error}"
        mark = "*" if entry.id == default else " "
        print(f"{mark} {entry.id:<26} {entry.kind:<6} {entry.task or '-':<17} {entry.origin:<8} {state:<18} "
              f"{entry.title}")
    print("* the default lesion model; details: meshnet-lesion models show ID")
    for name, reason in registry.damaged_imports().items():
        print(f"! damaged import {name}: {reason} (remove it: meshnet-lesion models remove {name})")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from .registry import entries_json

    registry = _registry()
    entry = registry.get(args.id)
    if args.json:
        print(json.dumps(entries_json([entry])[0], indent=1))
        return 0
    card = entry.card
    print(f"{entry.id}: {entry.title}")
    rows = [("task", entry.task), ("version", card.get("version")), ("input", card.get("input")),
            ("input convention", card.get("input_convention")), ("members", ", ".join(entry.member_ids)),
            ("description", card.get("description")), ("trained on", card.get("training_data")),
            ("license", card.get("license")), ("source", card.get("source")), ("citation", card.get("citation"))]
    for name, value in rows:
        if value:
            print(f"  {name + ':':<18} {value}")
    def figures(heading: str, key: str) -> None:
        print(heading)
        for item in card.get(key) or []:
            print(f"    - {item['name']}: {item['value']} ({item.get('source', 'no source given')})")

    figures(f"  {'metrics:':<18} {'' if card.get('metrics') else 'none published'}".rstrip(), "metrics")
    if card.get("metrics_note"):
        print(f"  {'note:':<18} {card['metrics_note']}")
    if card.get("default_reason"):
        print(f"  {'why the default:':<18} {card['default_reason']}")
    if card.get("measured"):
        figures("  measured by this project (not a published evaluation):", "measured")
    if card.get("standardization_note"):
        print(f"  {'standardisation:':<18} {card['standardization_note']}")
    if entry.kind == "model":
        here = registry.is_available(entry)
        print(f"  {'files:':<18} {'on this machine' if here else f'{registry.download_size(entry) / 1e6:.1f} MB to download'}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    registry = _registry()
    for entry_id in args.ids:
        for path in registry.fetch_all(entry_id):
            print(path)
    return 0


def _models_import(args: argparse.Namespace) -> int:
    if args.tile is not None and args.tile < 16:
        raise InputError(f"--tile must be at least 16 voxels, not {args.tile}")
    card = {"inference": {"tile": args.tile}} if args.tile else None
    entry = _registry().import_folder(args.folder, args.entry_id, args.title, args.task, card)
    print(f"imported {entry.id}: {entry.card.get('description', '')}")
    return 0


def _models_remove(args: argparse.Namespace) -> int:
    print(_registry().remove(args.id))
    return 0


def _models_clear(args: argparse.Namespace) -> int:
    registry = _registry()
    registry.clear_cache()
    print(f"cleared {registry.cache_dir / 'files'}")
    return 0


# ----------------------------------------------------------------------------- evaluate / train

def _evaluate(args: argparse.Namespace) -> int:
    from .dataset import read_pairs_or_bids
    from .evaluation import evaluate

    registry = _registry()
    report = {"pairs": str(args.pairs),
              **evaluate(read_pairs_or_bids(args.pairs), args.models or [registry.default_model().id],
                         registry=registry, device=args.device, brain_mask=args.brain_mask, progress=print)}
    if args.report:
        print(f"wrote {_write_json(args.report, report)}")
    return 0


def _training_data(args: argparse.Namespace):
    """(samples of an epoch, samples per epoch, validation samples) for train and tune."""
    from .dataset import load_training_pair, random_crops, read_pairs_or_bids

    samples = [load_training_pair(*pair) for pair in read_pairs_or_bids(args.pairs)]
    validation = ([load_training_pair(*pair) for pair in read_pairs_or_bids(args.validation)]
                  if args.validation else [])
    return (lambda epoch: random_crops(samples, args.crop, args.seed * 100_003 + epoch, args.lesion_crops),
            len(samples), validation)


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, save_checkpoint, train

    if args.output.suffix != ".safetensors":
        raise InputError("the output must be a .safetensors file")
    config = TrainConfig(channels=args.channels, epochs=args.epochs, restarts=args.restarts, lr=args.lr,
                         background_weight=args.background_weight, device=args.device, seed=args.seed)
    if args.teacher:
        return _distill(args, config)
    epoch_samples, count, validation = _training_data(args)
    model, history = train(epoch_samples, count, config, validation, progress=print)
    if int(os.environ.get("RANK", "0")) == 0:     # under torchrun, one process writes the result
        save_checkpoint(model, args.output, history)
        print(f"wrote {args.output} (import it with: meshnet-lesion models import FOLDER)")
    return 0


def _distill(args: argparse.Namespace, config) -> int:
    """``train --teacher``: a student learns the teacher's soft targets on crops of the given volumes."""
    import multiprocessing

    from . import distill
    from .dataset import read_pairs
    from .model import MeshNet
    from .pipeline import Segmenter
    from .registry import sha256_of
    from .volume import load_volume

    if args.workers < 0 or (args.workers and "fork" not in multiprocessing.get_all_start_methods()):
        raise InputError("--workers needs a number ≥ 0, and forked processes (Linux, macOS)")
    images = [args.pairs] if args.pairs.name.endswith(_SUFFIXES) else [image for image, _ in read_pairs(args.pairs)]
    state = args.state or args.output.with_suffix(".state")
    cache = args.teacher_cache or state.parent / f"{state.stem}.teacher"
    initial = MeshNet.load(args.init) if args.init else None          # checked before the teacher's minutes
    if initial is not None and initial.spec.layers[0].out_channels != config.channels:
        raise InputError(f"{args.init.name} is a MeshNet-{initial.spec.layers[0].out_channels}, "
                         f"not --channels {config.channels}")
    teacher = Segmenter(args.teacher, device=args.device, precision="fp32")
    views = []
    for image in images:
        print(f"teacher {args.teacher} on {image.name} (computed once, then read from {cache})", flush=True)
        views.append(distill.teacher_view(teacher, load_volume(image), cache))
    size = args.crop or 96
    lesions: list[Path] = []
    if args.lesions:
        from .synth import split_lesions

        lesions = split_lesions(sorted(args.lesions.glob("*.nii*")))[0]
        if not lesions:
            raise InputError(f"no lesion masks (*.nii, *.nii.gz) in {args.lesions}")
    renderings = _renderings(args, teacher, load_volume(images[0]), lesions, cache) if args.label_head else []
    settings = distill.DistillConfig(train=config, steps=args.steps, temperature=args.temperature,
                                     weight=args.distill_weight, save_every=args.save_every,
                                     initial=sha256_of(args.init) if args.init else "", gamma=args.gamma,
                                     bias=args.bias_field)
    model, record = distill.distill(
        lambda step: distill.crop_sample(views, step, args.seed, size, lesions, renderings, args.gamma,
                                         args.bias_field), settings, state,
        [view.x[view.box] for view in views], progress=partial(print, flush=True), stop_after=args.session_steps,
        conventions=teacher.spec, initial=initial, workers=args.workers)
    steps = len(record.losses)
    if steps < args.steps:
        print(f"stopped at step {steps} of {args.steps}; the same command continues from {state}")
        if not args.unfinished:
            return 0
    model.save(args.output, {"meshnet_distillation": json.dumps({
        "teacher": args.teacher, "channels": config.channels, "steps": steps, "crop": size, "temperature": args.temperature,
        **({"unfinished": f"step {steps} of {args.steps}"} if steps < args.steps else {}),
        "weight": args.distill_weight, "gamma": args.gamma, "bias_field": args.bias_field,
        "images": [str(p) for p in images], "painted_lesions": len(lesions),
        "renderings": len(renderings), "initial": _initial_run(args.init),
        "seconds": round(record.seconds, 1), "sessions": record.sessions,
        "losses_every_10": record.losses[::10]})})
    print(f"wrote {args.output}{' (unfinished)' if steps < args.steps else ''} "
          f"(import it with: meshnet-lesion models import FOLDER)")
    return 0


def _renderings(args: argparse.Namespace, teacher, first, lesions: list[Path], cache: Path) -> list:
    """``--renderings`` views of the label head for ``train --teacher``: seeds [13, i] (the quality suite
    renders with 7, 8 and 9), even i lesion-free, odd i with training-split lesions, every other pair with
    the contrast of ``first`` (the first training image) on the teacher's grid."""
    from . import distill, synth

    head = synth.build_label_head(args.label_head, _registry(), args.device)
    prepared = teacher.model_input(first)
    contrast = None if prepared.brain is None else synth.measured_contrast(prepared.grid.array, prepared.brain)
    views = []
    for index in range(args.renderings):
        kind = "lesion-free" if index % 2 == 0 else "with lesions"
        measured = contrast if (index // 2) % 2 else None
        print(f"rendering {index + 1}/{args.renderings} of {args.label_head.name} ({kind}, "
              f"{'measured' if measured is not None else 'random'} contrast; computed once, then read from {cache})",
              flush=True)
        views.append(distill.rendered_view(teacher, head, [13, index], lesions if index % 2 else [], measured, cache))
    return views


def _initial_run(path: Path | None) -> dict | None:
    """The training record of the student a fine-tuning run starts from (its file's name, SHA-256 and run)."""
    if path is None:
        return None
    from safetensors import safe_open

    from .registry import sha256_of

    with safe_open(str(path), framework="numpy") as handle:
        run = handle.metadata().get("meshnet_distillation")
    return {"file": path.name, "sha256": sha256_of(path), "run": json.loads(run) if run else None}


def _tune(args: argparse.Namespace) -> int:
    from .training import TrainConfig, tune

    epoch_samples, count, validation = _training_data(args)
    study = tune(epoch_samples, count, validation, args.trials, TrainConfig(device=args.device, seed=args.seed),
                 args.min_epochs, args.max_epochs, args.storage, args.study, progress=print)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "epochs": len(t.intermediate_values)} for t in study.trials]
    best = study.best_trial
    print(f"best trial {best.number}: validation Dice {best.value:.3f} with {best.params}")
    if args.report:
        print(f"wrote {_write_json(args.report, {'best': {'value': best.value, 'params': best.params}, 'trials': trials})}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from . import synth

    masks = sorted(p for p in args.lesions.glob("*") if p.name.endswith((".nii", ".nii.gz")))
    if not masks:
        raise InputError(f"no NIfTI lesion masks in {args.lesions}")
    training, held_out = synth.split_lesions(masks)
    chosen = {"train": training, "test": held_out, "all": masks}[args.split]
    registry = _registry()
    head = (synth.build_label_head(args.t1, registry, args.device) if args.t1
            else synth.build_real_head(args.t2, registry, args.device))
    pairs = synth.write_dataset(args.output, head, chosen, args.count, args.seed, args.lesion_free, args.workers,
                                progress=print)
    print(f"wrote {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
