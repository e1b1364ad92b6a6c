"""``meshnet-lesion evaluate | train | tune | synth``: parsing only; the work is done in :mod:`..train`."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ..errors import InputError
from .console import write_json
from .options import SUFFIXES, device_option, open_registry


def add_parsers(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score models on image,mask pairs (Dice, AVD, MCC; paired tests)")
    evaluate.add_argument("pairs", type=Path, help="CSV with image,mask rows, or an ARC-like BIDS folder")
    evaluate.add_argument("--model", dest="models", action="append", help="registry id (repeat to compare models)")
    device_option(evaluate)
    evaluate.add_argument("--no-brain-mask", dest="brain_mask", action="store_false", default=None)
    evaluate.add_argument("--report", type=Path, help="write per-subject scores and the tests as JSON")
    evaluate.set_defaults(handler=run_evaluate)

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
    device_option(trainer)
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
    trainer.set_defaults(handler=run_train)

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
    device_option(tuner)
    tuner.add_argument("--seed", type=int, default=0)
    tuner.add_argument("--report", type=Path, help="write every trial and the best parameters as JSON")
    tuner.set_defaults(handler=run_tune)

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
    device_option(synth, help="for the models that label the anatomy (default: auto)")
    synth.set_defaults(handler=run_synth)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..train.dataset import read_pairs_or_bids
    from ..train.evaluation import evaluate

    registry = open_registry()
    report = {"pairs": str(args.pairs),
              **evaluate(read_pairs_or_bids(args.pairs), args.models or [registry.default_model().id],
                         registry=registry, device=args.device, brain_mask=args.brain_mask, progress=print)}
    if args.report:
        print(f"wrote {write_json(args.report, report)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..train.dataset import epoch_data
    from ..train.training import TrainConfig, save_checkpoint, train

    if args.output.suffix != ".safetensors":
        raise InputError("the output must be a .safetensors file")
    config = TrainConfig(channels=args.channels, epochs=args.epochs, restarts=args.restarts, lr=args.lr,
                         background_weight=args.background_weight, device=args.device, seed=args.seed)
    if args.teacher:
        return _distill(args, config)
    epoch_samples, count, validation = epoch_data(args.pairs, args.validation, args.crop, args.seed, args.lesion_crops)
    model, history = train(epoch_samples, count, config, validation, progress=print)
    if int(os.environ.get("RANK", "0")) == 0:     # under torchrun, one process writes the result
        save_checkpoint(model, args.output, history)
        print(f"wrote {args.output} (import it with: meshnet-lesion models import FOLDER)")
    return 0


def _distill(args: argparse.Namespace, config) -> int:
    """``train --teacher``: the options as a :class:`~..train.distill.recipe.Recipe`; PAIRS may be one scan."""
    from ..train.dataset import read_pairs
    from ..train.distill.recipe import Recipe, distill_student

    images = (args.pairs,) if args.pairs.name.endswith(SUFFIXES) else tuple(image for image, _ in read_pairs(args.pairs))
    recipe = Recipe(images=images, **{f.name: getattr(args, f.name) for f in fields(Recipe) if f.name != "images"})
    written = distill_student(recipe, config)
    if written is not None:
        print(f"wrote {written}{' (unfinished)' if recipe.unfinished else ''} "
              f"(import it with: meshnet-lesion models import FOLDER)")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from ..train.dataset import epoch_data
    from ..train.training import TrainConfig, tune

    epoch_samples, count, validation = epoch_data(args.pairs, args.validation, args.crop, args.seed, args.lesion_crops)
    study = tune(epoch_samples, count, validation, args.trials, TrainConfig(device=args.device, seed=args.seed),
                 args.min_epochs, args.max_epochs, args.storage, args.study, progress=print)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "epochs": len(t.intermediate_values)} for t in study.trials]
    best = study.best_trial
    print(f"best trial {best.number}: validation Dice {best.value:.3f} with {best.params}")
    if args.report:
        print(f"wrote {write_json(args.report, {'best': {'value': best.value, 'params': best.params}, 'trials': trials})}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from ..train import synth

    masks = sorted(p for p in args.lesions.glob("*") if p.name.endswith((".nii", ".nii.gz")))
    if not masks:
        raise InputError(f"no NIfTI lesion masks in {args.lesions}")
    training, held_out = synth.split_lesions(masks)
    chosen = {"train": training, "test": held_out, "all": masks}[args.split]
    registry = open_registry()
    head = (synth.build_label_head(args.t1, registry, args.device) if args.t1
            else synth.build_real_head(args.t2, registry, args.device))
    pairs = synth.write_dataset(args.output, head, chosen, args.count, args.seed, args.lesion_free, args.workers,
                                progress=print)
    print(f"wrote {pairs}")
    return 0
