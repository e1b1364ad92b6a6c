"""``meshnet-lesion``: segment scans and manage models from the command line.

    meshnet-lesion segment T2.nii.gz -o lesion.nii.gz --report report.json
    meshnet-lesion segment sub-*.nii.gz -o results/          # batch: the model is loaded once
    meshnet-lesion segment BIDS_DIR -o DERIV_DIR [--shard 0/4]  # a study: BIDS derivatives, resumable
    meshnet-lesion report DERIV_DIR                           # the cohort's table and QC mosaic
    meshnet-lesion models list | show ID | fetch ID | import FOLDER | remove ID | clear-cache

One module per command group (:mod:`.segment`, :mod:`.study`, :mod:`.models`, :mod:`.train`), the options they
share declared once (:mod:`.options`), what is printed in :mod:`.console`. Parsing only: the work is done by the
core. This module holds ``main``: the parser, and how every failure becomes one line and an exit status.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import Cancelled, MeshNetLesionError
from . import models, segment, study, train
from .console import EXIT_BAD_INPUT, error

EXIT_CANCELLED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141  # 141, 143: as the signal
DESCRIPTION = ("Segment chronic stroke lesions on T2-weighted MRI with MeshNet, and manage its models. "
               "Research software: not for clinical use.")


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
        error("terminated")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        error("cancelled")
        return EXIT_CANCELLED
    except Cancelled as problem:
        error(str(problem))
        return EXIT_CANCELLED
    except MeshNetLesionError as problem:
        error(str(problem))
        return EXIT_BAD_INPUT
    except ImportError as problem:
        if "torch" not in f"{problem.name} {problem}":
            raise
        error(f"PyTorch could not be loaded ({problem}). If a memory limit is set (ulimit -v), it is too low for "
              "PyTorch: raise it or remove it")
        return EXIT_BAD_INPUT
    except OSError as problem:   # the file system said no where no check of ours did: one line, not a traceback
        where = f": {problem.filename}" if problem.filename else ""
        error(f"{problem.strerror or problem}{where}")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnet-lesion", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    segment.add_parser(commands)
    study.add_parsers(commands)
    models.add_parser(commands)
    train.add_parsers(commands)
    return parser
