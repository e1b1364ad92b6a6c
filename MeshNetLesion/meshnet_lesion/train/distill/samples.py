"""What a student is trained on: the teacher's view of each volume (its input and its cached probability), label-head
renderings with their own truth, and the crops of a step (degraded as real scans are, lesions painted in)."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...outputs import atomic_file
from ...volume import Volume
from .. import perturb, synth
from ..dataset import IGNORE

GAMMA, BIAS_FIELD = 0.3, 0.15    # the student's intensity augmentation by default (intensity_augmented)


class TeacherCache:
    """A teacher's lesion probabilities per input volume, computed once and kept on disk.

    Files are ``<key>.npz`` (``np.savez_compressed``, float16, read back with ``allow_pickle=False``);
    the key is the SHA-256 of the teacher's identity (id and weight files' hashes) and of the input
    array's bytes and shape, so a changed teacher or volume never meets a stale map.
    """

    def __init__(self, folder: Path, teacher_id: str, teacher_files: dict[str, str],
                 compute: Callable[[np.ndarray], np.ndarray]) -> None:
        self.folder = Path(folder)
        self.identity = json.dumps({"teacher": teacher_id, "files": teacher_files}, sort_keys=True)
        self.compute = compute
        self.computed = 0           # how many maps this cache had to compute (the rest came from disk)

    def key(self, volume: np.ndarray) -> str:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(str(volume.shape).encode())
        digest.update(np.ascontiguousarray(volume, np.float32).tobytes())
        return digest.hexdigest()

    def probability(self, volume: np.ndarray) -> np.ndarray:
        path = self.folder / f"{self.key(volume)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return stored["probability"].astype(np.float32)
        probability = np.asarray(self.compute(volume), np.float32)
        if probability.shape != volume.shape:
            raise ValueError(f"the teacher returned {probability.shape} for a {volume.shape} volume")
        self.computed += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(handle, probability=probability.astype(np.float16))
        return probability


Sample = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # student input, teacher probability, ground truth or None


def flips(step_seed: int) -> tuple[int, ...]:
    """The axes a sample is flipped along for a step (each with probability ½), from the step's seed."""
    rng = np.random.default_rng(step_seed)
    return tuple(axis for axis in range(3) if rng.random() < 0.5)


def intensity_augmented(image: np.ndarray, rng: np.random.Generator, gamma: float = GAMMA,
                        bias: float = BIAS_FIELD) -> np.ndarray:
    """The student's view of a normalised [0, 1] volume: a gamma between exp(−``gamma``) and exp(``gamma``),
    scale, a smooth bias field (1 ± ``bias``) and noise, on the head (background stays 0). The teacher keeps
    the clean volume."""
    head = image > 0
    out = image.astype(np.float32, copy=True)
    out[head] = out[head] ** math.exp(rng.uniform(-gamma, gamma))
    coarse = rng.uniform(-bias, bias, (4, 4, 4)).astype(np.float32)
    field = ndimage.zoom(coarse, [n / 4 for n in image.shape], order=3)[tuple(slice(0, n) for n in image.shape)]
    out *= rng.uniform(0.9, 1.1) * (1 + field)
    out[head] += rng.normal(0, 0.02, int(head.sum())).astype(np.float32)
    out[~head] = 0
    return np.clip(out, 0, 1)


@dataclass
class TeacherView:
    """One training volume as the teacher sees it: its clean input on the model grid (normalised and
    standardised as the pipeline does) and the teacher's lesion probability there, 0 outside the brain;
    with the brain mask, a real head on that grid to paint lesions into (its own lesion left out)."""

    x: np.ndarray
    soft: np.ndarray
    box: tuple[slice, slice, slice]       # the box the lesion network sees (brain + margin): crops, statistics
    brain: np.ndarray | None = None
    stripped: np.ndarray | None = None    # what a skull-stripped scan keeps: the brain mask dilated 3 voxels
    head: synth.Head | None = None
    white: float = 0.0                    # painted lesions' rim and core intensities take these two
    csf: float = 0.0
    truth: np.ndarray | None = None       # a rendering's known lesion (0/1): its target everywhere, no teacher

    @classmethod
    def of(cls, x: np.ndarray, soft: np.ndarray, box: tuple[slice, slice, slice], affine: np.ndarray,
           brain: np.ndarray | None) -> TeacherView:
        if brain is None or not brain.any():
            return cls(x, soft, box)
        head = synth.real_head(Volume(x, affine), brain, soft > 0.5, "teacher-view")
        white = float(np.percentile(x[head.placeable], 30))    # as synth.render paints a real head
        csf = float(np.percentile(x[brain & ~head.ignore], 98))
        return cls(x, soft, box, brain, ndimage.binary_dilation(brain, iterations=3), head, white, csf)


def network_input(teacher, volume: Volume):
    """What ``teacher`` (a :class:`~.pipeline.Segmenter`) feeds its lesion network for ``volume``: the
    prepared input (grid, brain mask) and the normalised, standardised array."""
    from ...preprocess import standardize

    prepared = teacher.model_input(volume)
    x = prepared.x
    if teacher.standardize and prepared.brain is not None:
        values = standardize(x, prepared.brain, teacher.spec.standardization)
        x = x if values is None else values
    return prepared, np.ascontiguousarray(x, np.float32)


def lesion_box(prepared) -> tuple[slice, slice, slice]:
    """The box the lesion network is run on: the brain and its margin, or the head without a brain mask."""
    from ...pipeline import LESION_BRAIN_MARGIN
    from ...preprocess import head_box

    if prepared.brain is not None and prepared.brain.any():
        return head_box(prepared.brain, LESION_BRAIN_MARGIN)
    return prepared.box


def _teacher_files(teacher) -> dict[str, str]:
    return {f.name: f.sha256 for member in teacher.registry.members(teacher.entry) for f in member.files}


def teacher_view(teacher, volume, cache_dir: Path) -> TeacherView:
    """The teacher's view of ``volume`` (a :class:`~.pipeline.Segmenter`), its probability cached on disk."""
    from ...pipeline import cropped

    prepared, x = network_input(teacher, volume)
    box = prepared.box

    def run(volume_x: np.ndarray) -> np.ndarray:
        crop, surround = cropped(volume_x, box)
        probability = np.zeros(volume_x.shape, np.float32)
        probability[box] = np.mean([engine.run(crop, probability_classes=[1], surround=surround).probabilities[0]
                                    for engine in teacher.engines], axis=0)
        return probability

    soft = TeacherCache(cache_dir, teacher.entry.id, _teacher_files(teacher), run).probability(x)
    if prepared.brain is not None:
        soft = soft * prepared.brain
    return TeacherView.of(x, soft.astype(np.float32), lesion_box(prepared), prepared.grid.affine, prepared.brain)


def rendering_draws(seed: Sequence[int], lesions: Sequence[Path]) -> tuple[np.random.Generator, list[Path]]:
    """The lesions a rendering seeded with ``seed`` carries (one or two of ``lesions``; none if empty), and the
    generator that then renders it (:func:`~.synth.render`), as :func:`rendered_view` draws them."""
    rng = np.random.default_rng(list(seed))
    chosen = [lesions[i] for i in rng.choice(len(lesions), min(len(lesions), int(rng.integers(1, 3))),
                                             replace=False)] if lesions else []
    return rng, chosen


def rendered_view(teacher, head: synth.Head, seed: Sequence[int], lesions: Sequence[Path],
                  contrast: np.ndarray | None, cache_dir: Path) -> TeacherView:
    """A rendering of a label head (:func:`~.synth.render` seeded with ``seed``: lesion-free when ``lesions``
    is empty, else with one or two of them) as the student is trained on it: the teacher's input (its grid,
    brain mask and standardisation) and the rendering's own lesion as the target everywhere.

    The teacher's probability is not used here: the ARC-trained teachers call false lesions on such
    renderings (the quality suite's lesion-free cases), and a student that learnt them would too; a
    rendering's truth is known. The view is cached in ``cache_dir`` (the rendering and its brain mask take
    a minute)."""
    rng, chosen = rendering_draws(seed, lesions)
    drawn = head.tissues if head.tissues is not None else head.image
    anatomy = hashlib.sha256(np.ascontiguousarray(drawn).tobytes() + head.affine.tobytes()).hexdigest()
    identity = json.dumps({"teacher": teacher.entry.id, "files": _teacher_files(teacher), "head": anatomy,
                           "seed": list(seed), "lesions": [p.name for p in chosen],
                           "contrast": None if contrast is None else np.round(contrast, 6).tolist()}, sort_keys=True)
    path = Path(cache_dir) / f"rendering-{hashlib.sha256(identity.encode()).hexdigest()}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            x, truth, brain = (stored[k] for k in ("x", "truth", "brain"))
            box = tuple(slice(int(a), int(b)) for a, b in stored["box"])
    else:
        image, mask, _ = synth.render(head, [synth.LesionSource.load(p) for p in chosen], rng, contrast=contrast)
        volume = Volume(image, head.affine)
        prepared, x = network_input(teacher, volume)
        truth = perturb.onto(mask == 1, volume, Volume(prepared.grid.array, prepared.grid.affine)).astype(np.uint8)
        brain = prepared.brain if prepared.brain is not None else prepared.grid.array > 0
        box = lesion_box(prepared)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(handle, x=x, truth=truth, brain=brain, box=np.array([[b.start, b.stop] for b in box]))
    return TeacherView(x, truth.astype(np.float32), box, brain=brain,
                       stripped=ndimage.binary_dilation(brain, iterations=3), truth=truth)


# What a step's sample is made of (shares of the samples).
PAINTED = 1 / 3            # a training-split SOOP lesion painted in: ground truth there, the teacher elsewhere


LESION_CENTRED = 1 / 3     # a crop centred on the teacher's own lesion (the rest: anywhere in the brain box)


TURNED = 0.7               # rotated (±10°) and scaled (±10 %) about the crop's centre


SKULL_STRIPPED = 0.2       # everything outside the brain mask (dilated 3 voxels) set to 0


THICK_SLICES = 0.3         # blurred along one axis, or all three (2-4 mm slices, 2 mm voxels)


RENDERED = 0.5             # of a run given renderings: a crop of one of them (half of those on its lesion, if any)


def crop_sample(views: list[TeacherView], step: int, seed: int, size: int,
                lesions: Sequence[Path] = (), renderings: Sequence[TeacherView] = (), gamma: float = GAMMA,
                bias: float = BIAS_FIELD) -> Sample:
    """Step ``step``'s sample: a volume, maybe with a lesion from ``lesions`` painted in, a ``size``³ crop
    (maybe turned), flips; the student's input degraded as scans are (skull-stripped, thick slices,
    intensities, ``gamma`` and ``bias`` as in :func:`intensity_augmented`), the teacher's target from the
    clean volume. With ``renderings`` (:func:`rendered_view`), a share of the samples are crops of those,
    their truth the target. The shares are the constants above."""
    rng = np.random.default_rng([seed, step])
    view = views[int(rng.integers(len(views)))]
    if renderings and rng.random() < RENDERED:
        view = renderings[int(rng.integers(len(renderings)))]
    image, soft, target, centre = view.x, view.soft, view.truth, None
    kind = rng.random()
    if view.truth is not None:
        lesion = np.argwhere(view.truth == 1) if kind < 0.5 else np.empty((0, 3))
        if len(lesion):
            centre = lesion[int(rng.integers(len(lesion)))]
    elif kind < PAINTED and lesions and view.head is not None:
        painted = _painted(view, synth.LesionSource.load(lesions[int(rng.integers(len(lesions)))]), rng)
        if painted is not None:
            image, soft, target, centre = painted
    if centre is None:
        lesion = np.argwhere(view.soft > 0.5) if kind < PAINTED + LESION_CENTRED else np.empty((0, 3))
        centre = lesion[int(rng.integers(len(lesion)))] if len(lesion) else \
            np.array([int(rng.integers(b.start, b.stop)) for b in view.box])
    if rng.random() < SKULL_STRIPPED and view.stripped is not None:
        image = image * view.stripped
    arrays = [image, soft] + ([] if target is None else [target])
    arrays = _crop(arrays, centre, size, rng)
    if rng.random() < THICK_SLICES:
        if rng.random() < 0.5:
            arrays[0] = ndimage.gaussian_filter1d(arrays[0], rng.uniform(0.6, 1.5), axis=int(rng.integers(3)))
        else:
            arrays[0] = ndimage.gaussian_filter(arrays[0], rng.uniform(0.4, 0.8))
    arrays[0] = intensity_augmented(arrays[0], rng, gamma, bias)
    axes = flips(int(rng.integers(2 ** 31)))
    arrays = [np.flip(a, axes).copy() for a in arrays]
    return arrays[0], arrays[1], None if target is None else arrays[2]


def _painted(view: TeacherView, source: synth.LesionSource, rng: np.random.Generator):
    """The view with ``source`` painted in: (image, teacher target, ground truth, a lesion voxel), or None
    when it found no place. The teacher's target is its own map, raised to the painted lesion's fraction;
    the ground truth is 1 in the painted lesion, 0 elsewhere and IGNORE over the view's own lesion."""
    for _ in range(10):
        placed = synth.place_lesion(source, view.head, rng)
        if placed is not None:
            break
    else:
        return None
    fraction, box = placed
    image = view.x.copy()
    synth.paint_lesion(image, fraction, box, view.white, view.csf, rng)
    soft = view.soft.copy()
    soft[box] = np.maximum(soft[box], fraction)
    target = np.zeros(view.x.shape, np.uint8)
    target[box] = fraction > 0.5
    target[view.head.ignore & (target == 0)] = IGNORE
    inside = np.argwhere(fraction > 0.5)
    centre = inside[int(rng.integers(len(inside)))] + [b.start for b in box]
    return image, soft, target, centre


def _crop(arrays: list[np.ndarray], centre: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``size``³ crops about ``centre`` (kept inside the volume); some turned and scaled about it, images
    and maps resampled linearly, a ground truth (the third array) by nearest neighbour."""
    shape = np.array(arrays[0].shape)
    edge = np.minimum(size, shape)
    centre = np.clip(np.asarray(centre), edge // 2, shape - (edge - edge // 2))
    if rng.random() >= TURNED:
        region = tuple(slice(int(c - e // 2), int(c - e // 2 + e)) for c, e in zip(centre, edge))
        return [np.ascontiguousarray(a[region]) for a in arrays]
    linear = synth.random_rotation(rng, 10) * rng.uniform(0.9, 1.1, 3)
    offsets = np.indices(tuple(edge), np.float32).reshape(3, -1) - ((edge - 1) / 2)[:, None]
    points = linear.astype(np.float32) @ offsets + centre[:, None].astype(np.float32)
    return [ndimage.map_coordinates(a, points, order=0 if index == 2 else 1, mode="constant",
                                    cval=0).reshape(tuple(edge)).astype(a.dtype, copy=False)
            for index, a in enumerate(arrays)]
