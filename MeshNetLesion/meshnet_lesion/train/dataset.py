"""Image/mask pairs for training and evaluation: a CSV of ``image,mask`` paths, conformed as inference sees them.

Mask values: 0 background, any other value lesion, except :data:`IGNORE` (255), which marks voxels
that are neither trained on nor scored (e.g. a real lesion in a scan used for synthetic lesions).
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..conform import conform, to_conformed
from ..errors import InputError
from ..spec import Normalization
from ..volume import Volume, load_volume


def read_pairs(path: str | Path) -> list[tuple[Path, Path]]:
    """Rows ``image,mask`` (a header row naming them is allowed); relative paths are relative to the CSV."""
    path = Path(path)
    pairs = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().startswith("#") or [c.strip().lower() for c in row[:2]] == ["image", "mask"]:
                continue
            if len(row) < 2:
                raise InputError(f"{path}: each row needs an image and a mask path, got {row}")
            image, mask = (path.parent / c.strip() if not Path(c.strip()).is_absolute() else Path(c.strip())
                           for c in row[:2])
            pairs.append((image, mask))
    if not pairs:
        raise InputError(f"{path}: no image,mask rows")
    return pairs


IGNORE = 255


# ARC's T2w acquisitions (the ``acq-`` entity): 3D SPACE with and without acceleration, and 2D turbo
# spin echo, which the paper excludes.
SPACE_ACQUISITIONS = ("spc3p2", "spc3")
_ACQ = re.compile(r"_acq-([a-zA-Z0-9]+)_")


@dataclass(frozen=True)
class BidsPair:
    subject: str
    session: str
    acquisition: str
    image: Path
    mask: Path


def read_bids(root: str | Path, acquisitions: Sequence[str] = SPACE_ACQUISITIONS) -> list[BidsPair]:
    """T2w / lesion-mask pairs of a BIDS data set laid out like ARC (OpenNeuro ds004884).

    Masks are ``derivatives/lesion_masks/sub-*/ses-*/anat/*_desc-lesion_mask.nii[.gz]``; each is paired
    with the T2w in ``sub-*/ses-*/anat`` whose name it starts with (ARC names the mask after the scan
    it was drawn on), else with the session's only T2w. Only the listed acquisitions are kept: SPACE
    by default, as the paper (turbo spin echo excluded).
    """
    root = Path(root)
    masks_root = root / "derivatives" / "lesion_masks"
    if not masks_root.is_dir():
        raise InputError(f"{root}: no derivatives/lesion_masks folder (expected an ARC-like BIDS layout)")
    pairs = []
    for mask in sorted(masks_root.glob("sub-*/ses-*/anat/*_desc-lesion_mask.nii*")):
        subject, session = mask.parts[-4], mask.parts[-3]
        scans = sorted((root / subject / session / "anat").glob("*_T2w.nii*"))
        stem = mask.name.split("_desc-lesion_mask")[0]
        named = [s for s in scans if s.name.split(".")[0] == stem or stem.startswith(s.name.split(".")[0])]
        scan = named[0] if named else (scans[0] if len(scans) == 1 else None)
        if scan is None:
            continue
        found = _ACQ.search(scan.name)
        acquisition = found.group(1).lower() if found else ""
        if acquisition in acquisitions:
            pairs.append(BidsPair(subject, session, acquisition, scan, mask))
    if not pairs:
        raise InputError(f"{root}: no T2w with a lesion mask and acquisition in {list(acquisitions)}")
    return pairs


def read_pairs_or_bids(path: str | Path) -> list[tuple[Path, Path]]:
    """A CSV of pairs, or an ARC-like BIDS folder (SPACE T2w only)."""
    path = Path(path)
    return [(p.image, p.mask) for p in read_bids(path)] if path.is_dir() else read_pairs(path)


def mask_on_source(mask: Volume, image: Volume, name: str = "mask") -> np.ndarray:
    """uint8 mask on the image's grid: 1 lesion, 0 background, :data:`IGNORE` not scored."""
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputError(f"{name}: the mask's grid differs from the image's (shape {mask.shape} vs {image.shape})")
    values = np.asarray(mask.array)
    return np.where(values == IGNORE, IGNORE, values > 0).astype(np.uint8)


def load_training_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(normalised conformed image float32, conformed mask uint8 with 0/1/IGNORE), both 256³, as the engine sees them."""
    from ..preprocess import normalize

    image = load_volume(image_path)
    mask = mask_on_source(load_volume(mask_path), image, str(mask_path))
    conformed = conform(image)
    return normalize(conformed.array, Normalization("minmax")), to_conformed(mask, conformed)


def random_crops(samples: Sequence[tuple[np.ndarray, np.ndarray]], size: int | None, seed: int,
                 lesion_fraction: float = 0.5) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each sample once, in random order; cropped to ``size``³ (centred on a lesion voxel half the time)."""
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(samples)):
        image, mask = samples[index]
        if size is None or size >= min(image.shape):
            yield image, mask
            continue
        lesion = np.argwhere(mask == 1)
        if len(lesion) and rng.random() < lesion_fraction:
            centre = lesion[rng.integers(len(lesion))]
        else:
            centre = np.array([rng.integers(0, s) for s in image.shape])
        lo = np.clip(centre - size // 2, 0, np.array(image.shape) - size)
        box = tuple(slice(int(a), int(a) + size) for a in lo)
        yield image[box], mask[box]


def epoch_data(pairs: Path, validation: Path | None, crop: int | None, seed: int, lesion_crops: float):
    """What ``train`` and ``tune`` learn from: (the samples of an epoch as a function of the epoch, samples per
    epoch, validation samples), from CSV or BIDS ``pairs`` and ``validation``."""
    samples = [load_training_pair(*pair) for pair in read_pairs_or_bids(pairs)]
    checks = [load_training_pair(*pair) for pair in read_pairs_or_bids(validation)] if validation else []
    return (lambda epoch: random_crops(samples, crop, seed * 100_003 + epoch, lesion_crops), len(samples), checks)
