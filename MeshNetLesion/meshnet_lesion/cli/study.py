"""A study from the command line: ``segment BIDS_DIR|MANIFEST`` (:mod:`..study.cohort`), ``submit`` (a Slurm job
array) and ``report`` (the cohort's table and mosaic)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InputError
from ..outputs import check_target
from .console import EXIT_BAD_INPUT, StudyProgress, error, note
from .options import build_segmenter, model_options, study_options


def add_parsers(commands) -> None:
    submitter = commands.add_parser("submit", help="a BIDS study as a Slurm job array (submitit; --local runs "
                                    "the same jobs on this machine)")
    submitter.add_argument("bids", type=Path, metavar="BIDS_DIR")
    submitter.add_argument("-o", "--output", required=True, type=Path, help="the derivatives folder")
    model_options(submitter)
    study_options(submitter)
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
    submitter.set_defaults(handler=run_submit)

    reporter = commands.add_parser("report", help="a study's table (TSV) and QC mosaic from its derivatives")
    reporter.add_argument("derivatives", type=Path, help="the folder `segment BIDS_DIR -o` wrote")
    reporter.add_argument("--tsv", type=Path, help="default: DERIVATIVES/lesions.tsv")
    reporter.add_argument("--mosaic", type=Path, help="default: DERIVATIVES/lesions_mosaic.png")
    reporter.set_defaults(handler=run_report)


def segment_study(args: argparse.Namespace) -> int:
    """A BIDS dataset or manifest: every scan as an idempotent job (:mod:`.cohort`), the model loaded once."""
    from ..study import cohort
    from ..study.scans import find_bids, read_manifest, shard_of

    source = args.inputs[0]
    if any(getattr(args, flag) is not None for flag in ("probabilities", "report", "preview")):
        raise InputError("with a BIDS folder or manifest, outputs follow the derivatives layout: use --probseg "
                         "instead of --probabilities; sidecars and previews are always written")
    if source.is_dir():
        output, dataset = args.output.resolve(), source.resolve()
        if output == dataset or (dataset in output.parents and (dataset / "derivatives") not in output.parents):
            raise InputError("the derivatives folder must be outside the dataset or inside its derivatives/ "
                             "(e.g. BIDS_DIR/derivatives/meshnet-lesion); the raw data is never written to")
        found = find_bids(source, args.output, args.participant_label, args.session_label, args.acq)
    else:
        found = read_manifest(source)
    scans = shard_of(found.scans, args.shard)
    if not found.scans:
        raise InputError(f"{source}: no T2w image matches (sub-*/[ses-*/]anat/*_T2w.nii[.gz] and the filters)")
    cohort.check_outputs(found.scans, args.probseg)   # all of them, whichever shard: before the model loads
    cohort.dataset_description(args.output, source if source.is_dir() else None)
    for image, reason in found.skipped:
        note(f"skipped {image}: {reason}", args.quiet)
    if args.quiet:
        import pooch

        pooch.get_logger().setLevel(logging.WARNING)
    segmenter = build_segmenter(args)
    options = {"brain_mask": args.brain_mask, "standardize": args.standardize, "min_lesion_ml": args.min_lesion_ml,
               "mirror": segmenter.mirror, "crop": not args.no_crop, "precision": args.precision}
    runner = cohort.Cohort(segmenter, args.output, options, probseg=args.probseg, overwrite=args.overwrite)
    tally = runner.run(scans, StudyProgress(sys.stderr.isatty(), args.quiet))
    busy = f", {tally.busy} being segmented by another run" if tally.busy else ""
    print(f"{tally.total} scan(s): {tally.done} segmented, {tally.skipped} already current{busy}, {tally.failed} failed"
          + (f" (see {args.output / 'logs' / 'failed'})" if tally.failed else ""), file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT if tally.failed else 0


def run_submit(args: argparse.Namespace) -> int:
    from ..study import cohort, submit
    from ..study.scans import find_bids

    if not args.local and not args.slurm_partition:
        raise InputError("submit needs --slurm-partition (or --local to run the jobs on this machine)")
    if args.scans_per_task < 1 or args.array_parallelism < 1:
        raise InputError("--scans-per-task and --array-parallelism must be at least 1")
    scans = find_bids(args.bids, args.output, args.participant_label, args.session_label, args.acq).scans
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
    from . import main

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


def run_report(args: argparse.Namespace) -> int:
    from ..study.report import collect, summary_lines, write_mosaic, write_tsv

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
        error(f"{len(damaged)} scan(s) have outputs that changed since they were written; run `segment` again")
    return EXIT_BAD_INPUT if damaged else 0
