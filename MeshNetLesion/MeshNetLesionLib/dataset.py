"""Image/mask pairs for training and evaluation: a CSV of ``image,mask`` paths, conformed as inference sees them."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .conform import conform, to_conformed
from .errors import InputError
from .spec import Normalization
from .volume import Volume, load_volume


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


def mask_on_source(mask: Volume, image: Volume, name: str = "mask") -> np.ndarray:
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputError(f"{name}: the mask's grid differs from the image's (shape {mask.shape} vs {image.shape})")
    return mask.array > 0


def load_training_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(normalised conformed image float32, conformed lesion mask uint8), both 256³, as the engine sees them."""
    from .pipeline import normalize

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
        lesion = np.argwhere(mask > 0)
        if len(lesion) and rng.random() < lesion_fraction:
            centre = lesion[rng.integers(len(lesion))]
        else:
            centre = np.array([rng.integers(0, s) for s in image.shape])
        lo = np.clip(centre - size // 2, 0, np.array(image.shape) - size)
        box = tuple(slice(int(a), int(a) + size) for a in lo)
        yield image[box], mask[box]
