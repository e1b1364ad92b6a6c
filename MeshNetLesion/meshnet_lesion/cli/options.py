"""What several commands share, declared once: the model and how it runs, the device, which scans of a study, the
scan suffixes, and the registry and Segmenter those options ask for."""
from __future__ import annotations

import argparse
from pathlib import Path

from .console import download_printer

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mgz", ".mgh", ".img", ".hdr")


def device_option(parser, help: str = "auto, cpu, cuda, cuda:N or mps (default: auto: a CUDA GPU, else the CPU)") -> None:
    parser.add_argument("--device", default="auto", help=help)


def stem(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def model_options(parser: argparse.ArgumentParser) -> None:
    """The model and how it runs (``segment`` and ``submit``)."""
    parser.add_argument("--model", default=None, help="registry id (default: the registry's default lesion model)")
    device_option(parser)
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


def study_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
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


def open_registry():
    from ..registry import Registry

    return Registry()


def build_segmenter(args: argparse.Namespace):
    """The Segmenter the model options ask for (loaded once per command), through the one typed request."""
    from ..pipeline import Segmenter
    from ..request import SegmentationRequest

    request = SegmentationRequest(args.model, device=args.device, precision=args.precision, brain_mask=args.brain_mask,
                                  standardize=args.standardize, mirror=args.mirror, min_lesion_ml=args.min_lesion_ml,
                                  crop_margin=None if args.no_crop else "auto")
    return Segmenter.for_request(request, download_progress=None if args.quiet else download_printer())
