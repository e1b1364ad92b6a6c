"""``meshnet-lesion``: segment scans and manage models from the command line.

    meshnet-lesion segment T2.nii.gz -o lesion.nii.gz --report report.json
    meshnet-lesion segment sub-*.nii.gz -o results/          # batch: the model is loaded once
    meshnet-lesion models list | show ID | fetch ID | import FOLDER | remove ID | clear-cache
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .errors import Cancelled, InputError, MeshNetLesionError, OutputError
from .outputs import OutputSet, atomic_file, check_writable, remove_leftovers

EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_BROKEN_PIPE = 2, 130, 141  # 141: as killed by SIGPIPE
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mgz", ".mgh", ".img", ".hdr")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()                 # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # the reader went away (`meshnet-lesion models list | head -3`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _error("cancelled")
        return EXIT_CANCELLED
    except Cancelled as error:
        _error(str(error))
        return EXIT_CANCELLED
    except MeshNetLesionError as error:
        _error(str(error))
        return EXIT_BAD_INPUT


def _error(message: str) -> None:
    print(f"meshnet-lesion: error: {message}", file=sys.stderr)


DESCRIPTION = ("Segment chronic stroke lesions on T2-weighted MRI with MeshNet, and manage its models. "
               "Research software: not for clinical use.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnet-lesion", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment one or more scans")
    seg.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="NIfTI, NRRD or MGH scan(s)")
    seg.add_argument("-o", "--output", required=True, type=Path,
                     help="label map file (one input) or an existing folder (several inputs)")
    seg.add_argument("--model", default=None, help="registry id (default: the registry's default lesion model)")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    seg.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="auto = fp16 on CUDA, fp32 elsewhere")
    mask = seg.add_mutually_exclusive_group()
    mask.add_argument("--no-brain-mask", dest="brain_mask", action="store_false", default=None,
                      help="skip brain extraction: lesions are not restricted to the brain and intensities are "
                           "not standardised (both on by default for lesion models)")
    mask.add_argument("--brain-mask", dest="brain_mask", action="store_true", help="restrict labels to the brain")
    seg.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                     help="feed the model its normalised scan as it is, without mapping the brain's intensities "
                          "onto the model's reference landmarks")
    seg.add_argument("--min-lesion-ml", type=float, default=0.0, help="drop lesion components smaller than this")
    seg.add_argument("--probabilities", type=Path, help="also write the probability map (file, or folder in batch)")
    seg.add_argument("--report", type=Path, help="write a JSON report (file, or folder in batch)")
    seg.add_argument("--preview", type=Path, help="write a PNG with the labels outlined (file, or folder in batch)")
    seg.add_argument("--no-crop", action="store_true", help="run on the whole 256³ grid instead of the head box")
    seg.add_argument("-q", "--quiet", action="store_true",
                     help="no progress (bar, stage lines, download messages); the result line stays")
    seg.set_defaults(handler=_segment)

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
            if role != "input" and path is not None and path.is_dir():
                raise InputError(f"--{role} names a folder, not a file: {path}")
    return plans


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: the file itself if it exists (hard links too), else the resolved path."""
    try:
        stat = path.stat()
        return ("file", stat.st_dev, stat.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


def _refuse_shared_paths(plans: list[dict[str, Path | None]]) -> None:
    """Two roles on one file (``-o`` = the input, ``--report`` = ``-o``, …) would overwrite one with the other."""
    seen: dict[tuple, str] = {}
    for plan in plans:
        for role, path in plan.items():
            if path is None:
                continue
            key = _identity(path)
            name = f"the input {path}" if role == "input" else f"--{role} {path}"
            if key in seen:
                raise InputError(f"{seen[key]} and {name} are the same file; nothing was run, nothing was written")
            seen[key] = name


def _segment(args: argparse.Namespace) -> int:
    from .pipeline import Segmenter
    from .volume import load_volume

    plans = _plan(args)
    remove_leftovers({path.parent for plan in plans for role, path in plan.items() if role != "input" and path})
    interactive = sys.stderr.isatty()
    if args.quiet:
        import pooch

        pooch.get_logger().setLevel(logging.WARNING)   # pooch says "Downloading ..." at INFO
    segmenter = Segmenter(args.model, device=args.device, precision=args.precision, brain_mask=args.brain_mask,
                          standardize=args.standardize, min_lesion_ml=args.min_lesion_ml,
                          crop_margin=None if args.no_crop else "auto",
                          download_progress=None if args.quiet else _download_printer())
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
    entry = _registry().import_folder(args.folder, args.entry_id, args.title, args.task)
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
    epoch_samples, count, validation = _training_data(args)
    model, history = train(epoch_samples, count, config, validation, progress=print)
    if int(os.environ.get("RANK", "0")) == 0:     # under torchrun, one process writes the result
        save_checkpoint(model, args.output, history)
        print(f"wrote {args.output} (import it with: meshnet-lesion models import FOLDER)")
    return 0


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
