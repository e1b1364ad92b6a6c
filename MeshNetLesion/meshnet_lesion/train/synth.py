"""Synthetic chronic-stroke T2w volumes from real parts, for training and testing lesion models.

Real lesion shapes (binary masks in MNI space, e.g. the 1,449 SOOP masks) are mapped into a real
head and painted with a chronic-lesion T2 intensity model:

- **Placement.** A 9-parameter box alignment takes the mask's MNI grid onto the head's brain
  bounding box (the SOOP grid is the MNI brain's box), then a random rotation (±10°), scaling
  (±15 %), shift (±8 mm), left-right mirroring and a smooth elastic displacement (SynthSeg-style:
  a coarse random field, upsampled). Voxels outside the head's parenchyma are cut away, and a head
  can forbid a region (its own lesion), in which case a placement touching it is redrawn.
- **Intensity.** A CSF-like core (encephalomalacia) inside a gliotic rim 1-3 mm thick whose signal
  lies between white matter and CSF, a little texture, and partial volume at the border (the mask
  is resampled linearly, so edge voxels mix lesion and tissue). Mass effect (ex-vacuo ventricle
  enlargement) is not modelled.
- **Anatomy.** A *label head* is a real T1w scan's label map (brainchop's subcortical and brain
  models run on it) rendered with a random T2-like contrast, deformed per sample; a *real head* is a
  real T2w scan whose own lesion (found by the ARC-trained model, dilated) is excluded from
  placement and from scoring.
- **Domain randomisation** (label heads): per-tissue means in T2 order with wide ranges, texture,
  gamma, a smooth multiplicative bias field, anisotropic blur (thick slices), Gaussian noise, head
  pose and left-right mirroring.

Every output is a 256³ 1 mm volume on the head's conformed grid, written as uint8 like a conformed
scan, so training and evaluation read it through the same conform and normalise as inference.
Mask values: 0 background, 1 lesion, :data:`IGNORE` not scored (a real head's own lesion).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ..conform import SHAPE
from ..volume import Volume, load_volume, save_volume
from .dataset import IGNORE

# Our tissue classes, and the brainchop subcortical labels (FreeSurfer names) that map onto them.
BACKGROUND, CSF, CORTEX, WHITE, DEEP_GREY, PALLIDUM, CEREBELLUM_GREY, CEREBELLUM_WHITE, STEM, LIMBIC = range(10)
HEAD_TISSUES = (10, 11, 12)          # non-brain head voxels split by T1 intensity (dark, middle, bright)
NUM_TISSUES = 13
_SUBCORTICAL_TO_TISSUE = {
    0: CSF,  # inside the brain mask but not a labelled structure: sulcal CSF
    1: WHITE, 2: CORTEX, 3: CSF, 4: CSF, 5: CEREBELLUM_WHITE, 6: CEREBELLUM_GREY, 7: DEEP_GREY, 8: DEEP_GREY,
    9: DEEP_GREY, 10: PALLIDUM, 11: CSF, 12: CSF, 13: STEM, 14: LIMBIC, 15: LIMBIC, 16: DEEP_GREY, 17: DEEP_GREY,
}
PARENCHYMA = (CORTEX, WHITE, DEEP_GREY, PALLIDUM, CEREBELLUM_GREY, CEREBELLUM_WHITE, STEM, LIMBIC)


@dataclass
class Head:
    """Anatomy on a conformed 256³ grid that lesions are placed into."""

    name: str
    affine: np.ndarray
    placeable: np.ndarray              # bool: voxels a lesion may occupy (parenchyma)
    brain: np.ndarray                  # bool: the brain mask (sets the MNI box alignment)
    tissues: np.ndarray | None = None  # uint8 tissue classes (label heads)
    image: np.ndarray | None = None    # real intensities (real heads)
    ignore: np.ndarray | None = None   # bool: the head's own lesion region, never placed into nor scored

    def __post_init__(self) -> None:
        if (self.tissues is None) == (self.image is None):
            raise ValueError("a head has either tissue labels (rendered) or a real image")


def label_head(t1: Volume, subcortical: np.ndarray, brain: np.ndarray, name: str = "label-head") -> Head:
    """A label head from a conformed T1w scan, its brainchop subcortical labels and brain mask."""
    tissues = np.zeros(SHAPE, np.uint8)
    lookup = np.zeros(256, np.uint8)
    for label, tissue in _SUBCORTICAL_TO_TISSUE.items():
        lookup[label] = tissue
    tissues[brain] = lookup[subcortical[brain]]
    t1_array = np.asarray(t1.array, np.float32)
    head = _head_mask(t1_array, 0.08) & ~brain
    cuts = np.percentile(t1_array[head], [33.3, 66.7])
    tissues[head] = np.array(HEAD_TISSUES, np.uint8)[np.digitize(t1_array[head], cuts)]
    return Head(name, t1.affine, np.isin(tissues, PARENCHYMA), brain, tissues=tissues)


def real_head(t2: Volume, brain: np.ndarray, own_lesion: np.ndarray, name: str = "real-head",
              margin_mm: int = 5) -> Head:
    """A real T2w head; its own lesion, dilated by ``margin_mm``, is neither placed into nor scored."""
    image = np.asarray(t2.array, np.float32)
    ignore = ndimage.binary_dilation(own_lesion, iterations=margin_mm) if own_lesion.any() else np.zeros(SHAPE, bool)
    csf_cut = np.percentile(image[brain & ~ignore], 92)   # T2-bright CSF is not parenchyma
    placeable = ndimage.binary_erosion(brain, iterations=2) & (image < csf_cut) & ~ignore
    return Head(name, t2.affine, placeable, brain, image=image, ignore=ignore)


def build_label_head(t1_path: Path, registry=None, device: str = "auto") -> Head:
    """Run brainchop's subcortical and brain-extraction models on a conformed T1w scan."""
    from ..pipeline import Segmenter

    t1 = _conformed_volume(t1_path)
    subcortical = Segmenter("brainchop-subcortical", registry=registry, device=device, brain_mask=False)
    brain = Segmenter("brainchop-mindgrab", registry=registry, device=device).segment(t1).labels == 1
    return label_head(t1, subcortical.segment(t1).labels.astype(np.uint8), brain, _name(t1_path))


def build_real_head(t2_path: Path, registry=None, device: str = "auto", lesion_model: str | None = None) -> Head:
    """A real T2w head whose own lesion is found by ``lesion_model`` (the registry's default lesion model)."""
    from ..pipeline import Segmenter

    t2 = _conformed_volume(t2_path)
    result = Segmenter(lesion_model, registry=registry, device=device).segment(t2)
    return real_head(t2, result.brain, result.labels == 1, _name(t2_path))


def _conformed_volume(path: Path) -> Volume:
    from ..conform import conform

    conformed = conform(load_volume(path))
    return Volume(conformed.array, conformed.affine)


def _name(path: Path) -> str:
    return Path(path).name.split(".")[0]


# ---------------------------------------------------------------------------------------- lesions
@dataclass(frozen=True)
class LesionSource:
    """A binary lesion mask on an MNI grid."""

    path: Path
    array: np.ndarray     # bool
    affine: np.ndarray    # voxel -> MNI mm

    @classmethod
    def load(cls, path: Path) -> LesionSource:
        volume = load_volume(path)
        return cls(Path(path), np.asarray(volume.array) > 0, volume.affine)


def split_lesions(paths: Sequence[Path], held_out: float = 0.1) -> tuple[list[Path], list[Path]]:
    """(training, held-out) by a hash of the file name: stable, and independent of the list's order."""
    def bucket(path: Path) -> float:
        return int(hashlib.sha256(Path(path).name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    train = [p for p in paths if bucket(p) >= held_out]
    test = [p for p in paths if bucket(p) < held_out]
    return sorted(train), sorted(test)


def random_rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    rotation = np.eye(3)
    for axis in range(3):
        angle = math.radians(rng.uniform(-degrees, degrees))
        c, s = math.cos(angle), math.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        rotation = rotation @ r
    return rotation


def _box(lo: Sequence[float], hi: Sequence[float], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (lo, hi) of the voxel index box [lo, hi]."""
    corners = np.array([[(lo, hi)[c][d] for d, c in enumerate(bits)] for bits in np.ndindex(2, 2, 2)], float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(0), world.max(0)


def _mask_box(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    return _box([a[0] for a in axes], [a[-1] for a in axes], affine)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, scale: float) -> np.ndarray:
    field = rng.normal(0, scale, (coarse,) * 3).astype(np.float32)
    return ndimage.zoom(field, [s / coarse for s in shape], order=3, mode="nearest", grid_mode=True)[
        tuple(slice(0, s) for s in shape)]


def place_lesion(source: LesionSource, head: Head, rng: np.random.Generator,
                 mirror: bool | None = None) -> tuple[np.ndarray, tuple[slice, ...]] | None:
    """Partial-volume lesion fraction (float32 in [0, 1]) in a box of the head's grid, or None when the
    mapped lesion mostly misses the parenchyma or touches the head's forbidden region."""
    lesion_voxels = np.argwhere(source.array)
    if len(lesion_voxels) == 0:
        return None
    grid_lo, grid_hi = _box((0, 0, 0), np.array(source.array.shape) - 1, source.affine)
    brain_lo, brain_hi = _mask_box(head.brain, head.affine)
    brain_lo, brain_hi = brain_lo - 5, brain_hi + 5
    # subject world -> MNI world: per-axis box alignment, then a random similarity about the lesion
    scale = (grid_hi - grid_lo) / (brain_hi - brain_lo)
    if mirror if mirror is not None else rng.random() < 0.5:
        flip = np.diag([-1.0, 1.0, 1.0])
    else:
        flip = np.eye(3)
    centre_mni = source.affine[:3, :3] @ lesion_voxels.mean(0) + source.affine[:3, 3]
    jitter = random_rotation(rng, 10) * rng.uniform(0.85, 1.15, 3)
    shift = rng.uniform(-8, 8, 3)
    to_mni = np.eye(4)
    linear = flip @ np.diag(scale)
    to_mni[:3, :3] = linear
    to_mni[:3, 3] = grid_lo - linear @ (brain_hi * (np.diag(flip) < 0) + brain_lo * (np.diag(flip) > 0))
    perturb = np.eye(4)
    perturb[:3, :3] = np.linalg.inv(jitter)
    perturb[:3, 3] = centre_mni - perturb[:3, :3] @ (centre_mni + shift)
    voxel_to_mni_voxel = np.linalg.inv(source.affine) @ perturb @ to_mni @ head.affine
    # where the lesion lands on the head grid: its MNI box through the inverse map, plus a margin
    lo_v, hi_v = lesion_voxels.min(0) - 1, lesion_voxels.max(0) + 1
    corners = np.array([[lo_v[d] if c == 0 else hi_v[d] for d, c in enumerate(bits)] + [1]
                        for bits in np.ndindex(2, 2, 2)], float)
    on_head = (np.linalg.inv(voxel_to_mni_voxel) @ corners.T).T[:, :3]
    lo = np.clip(np.floor(on_head.min(0)) - 4, 0, 256).astype(int)
    hi = np.clip(np.ceil(on_head.max(0)) + 5, 0, 256).astype(int)
    if np.any(hi - lo < 2):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"))
    shape = grid.shape[1:]
    warp = [_smooth_field(rng, shape, 4, 2.0) for _ in range(3)]   # elastic, mm ~ voxels
    points = np.einsum("ij,j...->i...", voxel_to_mni_voxel[:3, :3], grid + np.stack(warp))
    points += voxel_to_mni_voxel[:3, 3].reshape(3, 1, 1, 1)
    fraction = ndimage.map_coordinates(source.array.astype(np.float32), points, order=1, mode="constant")
    mapped = np.count_nonzero(fraction > 0.5)
    fraction *= head.placeable[box]
    kept = np.count_nonzero(fraction > 0.5)
    if kept < 10 or kept < 0.5 * mapped:           # most of it fell outside the parenchyma: draw again
        return None
    if head.ignore is not None and np.any(head.ignore[box] & (fraction > 0)):
        return None
    return fraction.astype(np.float32), box


def paint_lesion(image: np.ndarray, fraction: np.ndarray, box: tuple[slice, ...], white: float, csf: float,
                 rng: np.random.Generator) -> None:
    """Chronic T2 lesion into ``image`` (in place): CSF-like core, gliotic rim, texture, partial volume."""
    inside = fraction > 0.5
    depth = ndimage.distance_transform_edt(inside)
    rim = rng.uniform(1.0, 3.0)
    core_value = csf * rng.uniform(0.8, 1.0)
    rim_value = white + (csf - white) * rng.uniform(0.3, 0.65)
    blend = np.clip((depth - rim) / 2.0, 0, 1)
    value = rim_value + (core_value - rim_value) * blend
    value *= 1 + _smooth_field(rng, fraction.shape, 6, 0.04)
    region = image[box]
    region += fraction * (value - region)


# ---------------------------------------------------------------------------------------- rendering
def _t2_contrast(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random per-tissue means and standard deviations in T2w order (CSF > grey > white)."""
    means = np.zeros(NUM_TISSUES, np.float32)
    means[WHITE] = rng.uniform(0.22, 0.42)
    means[CORTEX] = means[WHITE] + rng.uniform(0.05, 0.2)
    means[CSF] = rng.uniform(max(0.7, means[CORTEX] + 0.2), 1.0)
    means[DEEP_GREY] = means[WHITE] + rng.uniform(0.0, 0.15)
    means[PALLIDUM] = means[WHITE] * rng.uniform(0.75, 1.0)
    means[CEREBELLUM_GREY] = means[CORTEX] * rng.uniform(0.9, 1.1)
    means[CEREBELLUM_WHITE] = means[WHITE] * rng.uniform(0.9, 1.1)
    means[STEM] = means[WHITE] * rng.uniform(0.9, 1.2)
    means[LIMBIC] = means[CORTEX] * rng.uniform(0.95, 1.1)
    means[list(HEAD_TISSUES)] = rng.uniform(0.05, 0.9, len(HEAD_TISSUES))
    means[BACKGROUND] = rng.uniform(0.0, 0.03)
    stds = rng.uniform(0.005, 0.04, NUM_TISSUES).astype(np.float32)
    return means, stds


def measured_contrast(t2: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Per-tissue means of a real T2w scan, for renderings that look like that scan rather than random.

    Three intensity clusters (1-D k-means) of the brain give white matter, grey matter and CSF, three of
    the head outside the brain give the dark, middle and bright non-brain tissues (matched in order to
    a label head's T1 terciles: bone and air, muscle, fat and marrow are darkest, middle and brightest on a
    fast spin-echo T2 as on a T1). Deep grey lies halfway between white and grey, pallidum below white
    (iron), brainstem a little above it. All relative to the brain's 99.9th percentile."""
    t2 = np.asarray(t2, np.float32)
    scale = float(np.percentile(t2[brain], 99.9)) or 1.0
    white, grey, csf = _clusters(t2[brain] / scale)
    outside = ndimage.binary_dilation(brain, iterations=2)
    head = _head_mask(t2, 0.05)
    means = np.zeros(NUM_TISSUES, np.float32)
    means[list(HEAD_TISSUES)] = _clusters(t2[head & ~outside] / scale)
    means[[WHITE, CORTEX, CSF]] = white, grey, csf
    means[[DEEP_GREY, PALLIDUM, STEM]] = (white + grey) / 2, 0.87 * white, 1.1 * white
    means[[CEREBELLUM_GREY, CEREBELLUM_WHITE, LIMBIC]] = grey, white, grey
    return means


def _head_mask(image: np.ndarray, fraction: float) -> np.ndarray:
    """The head: voxels above ``fraction`` of the 99.5th percentile, closed and hole-filled."""
    return ndimage.binary_fill_holes(ndimage.binary_closing(image > fraction * np.percentile(image, 99.5),
                                                            iterations=2))


def _clusters(values: np.ndarray, k: int = 3, iterations: int = 50) -> np.ndarray:
    """Sorted centres of a 1-D k-means."""
    centres = np.percentile(values, np.linspace(10, 90, k))
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[nearest == j].mean() if np.any(nearest == j) else centres[j] for j in range(k)])
    return np.sort(centres).astype(np.float32)


def _deform_labels(tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random pose (±8°, ±8 % scale, ±6 mm) and elastic warp of a label map, nearest neighbour."""
    centre = (np.array(SHAPE) - 1) / 2
    linear = random_rotation(rng, 8) * rng.uniform(0.92, 1.08, 3)
    offset = centre - linear @ centre + rng.uniform(-6, 6, 3)
    coarse = [_smooth_field(rng, (64, 64, 64), 5, 2.5) for _ in range(3)]
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 4, dtype=np.float32)] * 3, indexing="ij"))
    points = np.einsum("ij,j...->i...", linear, grid) + offset.reshape(3, 1, 1, 1) + np.stack(coarse)
    full = np.stack([ndimage.zoom(p, 4, order=1, grid_mode=False)[:256, :256, :256] for p in points])
    return ndimage.map_coordinates(tissues, full, order=0, mode="constant", cval=BACKGROUND)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(image, 99.9)) or 1.0
    return np.clip(np.rint(image / hi * 255), 0, 255).astype(np.uint8)


def anatomy(head: Head, rng: np.random.Generator) -> np.ndarray:
    """A label head's tissue map deformed and perhaps mirrored, as :func:`render` draws it first from ``rng``:
    a generator seeded as a rendering's gives that rendering's anatomy."""
    tissues = _deform_labels(head.tissues, rng)
    return tissues[::-1] if rng.random() < 0.5 else tissues     # axis 0 is left-right on the conformed LIA grid


def rendered_brain(tissues: np.ndarray) -> np.ndarray:
    """The brain of a tissue map: CSF and every brain tissue, no head tissue."""
    return (tissues >= CSF) & (tissues < HEAD_TISSUES[0])


def render(head: Head, lesions: Sequence[LesionSource], rng: np.random.Generator,
           max_tries: int = 30, contrast: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic volume: (uint8 image, uint8 mask, what was drawn). ``lesions`` empty: lesion-free.

    A label head is rendered with a random T2-like contrast and strong randomisation (for training), or,
    given ``contrast`` (per-tissue means, :func:`measured_contrast`), with that contrast and only mild
    changes (a ±5 % bias field, light blur and noise): a test image that looks like a real scan."""
    info: dict = {"head": head.name, "lesions": [], "contrast": "random" if contrast is None else "measured"}
    if head.tissues is not None:
        tissues = anatomy(head, rng)
        brain = rendered_brain(tissues)
        work = Head(head.name, head.affine, np.isin(tissues, PARENCHYMA), brain, tissues=tissues)
        if contrast is None:
            means, stds = _t2_contrast(rng)
        else:
            means, stds = np.asarray(contrast, np.float32), np.full(NUM_TISSUES, 0.03, np.float32)
        image = means[tissues] + stds[tissues] * ndimage.gaussian_filter(
            rng.standard_normal(SHAPE, dtype=np.float32), 0.7) * 2.0
        white, csf = float(means[WHITE]), float(means[CSF])
    else:
        work = head
        image = head.image.astype(np.float32).copy()
        brain_values = image[head.placeable]
        white, csf = float(np.percentile(brain_values, 30)), float(np.percentile(image[head.brain & ~head.ignore], 98))
    mask = np.zeros(SHAPE, np.uint8)
    for source in lesions:
        for _ in range(max_tries):
            placed = place_lesion(source, work, rng)
            if placed is not None:
                break
        else:
            continue
        fraction, box = placed
        paint_lesion(image, fraction, box, white, csf, rng)
        mask[box] |= (fraction > 0.5).astype(np.uint8)
        info["lesions"].append({"source": source.path.name, "voxels": int(np.count_nonzero(fraction > 0.5))})
    if head.tissues is not None:
        image = _randomise(image, rng, info, mild=contrast is not None)
    if head.ignore is not None:
        mask[head.ignore & (mask == 0)] = IGNORE
    info["lesion_voxels"] = int(np.count_nonzero(mask == 1))
    return _to_uint8(image), mask, info


def _randomise(image: np.ndarray, rng: np.random.Generator, info: dict, mild: bool = False) -> np.ndarray:
    bias = np.exp(_smooth_field(rng, SHAPE, 4, 0.05 if mild else rng.uniform(0.05, 0.3)))
    image = np.clip(image * bias, 0, None)
    gamma = 1.0 if mild else float(np.exp(rng.normal(0, 0.2)))
    image = (image / max(float(image.max()), 1e-6)) ** gamma
    sigma = np.full(3, 0.5) if mild else rng.uniform(0.0, 0.6, 3)
    if not mild:
        sigma[rng.integers(3)] = rng.uniform(0.0, 1.5)    # one thick-slice axis
    image = ndimage.gaussian_filter(image, sigma)
    noise = 0.01 if mild else rng.uniform(0.0, 0.03)
    image = image + rng.normal(0, noise, SHAPE).astype(np.float32)
    info.update(bias=True, gamma=round(gamma, 3), blur_sigma=[round(float(s), 2) for s in sigma],
                noise=round(noise, 4))
    return np.clip(image, 0, None).astype(np.float32)


# ---------------------------------------------------------------------------------------- data sets
def lesion_count(rng: np.random.Generator) -> int:
    """Most chronic strokes have one lesion; some have two or three."""
    return int(rng.choice([1, 1, 1, 2, 2, 3]))


_JOB: dict = {}


def _write_one(index: int) -> dict:
    head, lesion_paths, seed, lesion_free, out = (_JOB[k] for k in ("head", "lesions", "seed", "lesion_free", "out"))
    rng = np.random.default_rng([seed, index])
    chosen = [] if lesion_free else [lesion_paths[i] for i in
                                     rng.choice(len(lesion_paths), lesion_count(rng), replace=False)]
    image, mask, info = render(head, [LesionSource.load(p) for p in chosen], rng)
    stem = f"{index:03d}"
    save_volume(out / f"{stem}_T2w.nii.gz", image, head.affine)
    save_volume(out / f"{stem}_lesion.nii.gz", mask, head.affine, label=True)
    return {"index": index, "image": f"{stem}_T2w.nii.gz", "mask": f"{stem}_lesion.nii.gz", **info}


def write_dataset(out: Path, head: Head, lesion_paths: Sequence[Path], count: int, seed: int,
                  lesion_free: bool = False, workers: int = 1,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Render ``count`` volumes into ``out`` (``NNN_T2w.nii.gz``, ``NNN_lesion.nii.gz``, ``pairs.csv``,
    ``synth.json``). Each volume's random stream comes from (seed, index), so any one can be rebuilt
    and the result does not depend on ``workers``. ``pairs.csv`` is written last: a folder without it
    is unfinished."""
    import multiprocessing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.csv").unlink(missing_ok=True)
    _JOB.update(head=head, lesions=list(lesion_paths), seed=seed, lesion_free=lesion_free, out=out)
    records = []
    parallel = workers > 1 and "fork" in multiprocessing.get_all_start_methods()
    pool = multiprocessing.get_context("fork").Pool(workers) if parallel else None  # forked workers share the head
    try:
        for record in (pool.imap if pool else map)(_write_one, range(count)):
            records.append(record)
            if progress:
                progress(f"{out.name} {len(records)}/{count}: {record['lesion_voxels']} lesion voxels")
    finally:
        if pool:
            pool.terminate()
        _JOB.clear()
    rows = [(r.pop("image"), r.pop("mask")) for r in records]
    with (out / "pairs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask"])
        writer.writerows(rows)
    (out / "synth.json").write_text(json.dumps({"seed": seed, "head": head.name, "lesion_free": lesion_free,
                                                "volumes": records}, indent=1), encoding="utf-8")
    return out / "pairs.csv"
