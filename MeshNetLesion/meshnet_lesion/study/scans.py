"""Which scans a study holds and where each one's outputs go: a BIDS dataset's T2w images (filtered by subject,
session and acquisition; a session's 3D SPACE T2w preferred), a CSV manifest's rows, and a shard of them.

Why not pybids: it indexes the whole dataset into SQLite (slow on large cohorts, a heavy dependency
with SQLAlchemy) while this needs only ``sub-*/[ses-*/]anat/*_T2w.nii[.gz]`` and the entities in a
file name, which BIDS defines exactly.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

# 3D SPACE T2w, what the ARC-trained models saw (ARC's ``acq-spc3p2`` / ``acq-spc3``); preferred over
# other T2w acquisitions of the same session (ARC's turbo spin echo ``acq-tse3``).
SPACE_MARKERS = ("spc", "space")
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)$")
_NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Scan:
    """One T2w image to segment and where its outputs go."""

    source: Path
    mask: Path                      # the label map; the sidecar is beside it (.json)
    probseg: Path
    preview: Path
    subject: str = ""
    session: str = ""
    relative: str = ""             # the source's path inside its BIDS dataset ("" for a manifest row)

    @property
    def sidecar(self) -> Path:
        return self.mask.with_name(stem(self.mask) + ".json")

    @property
    def label(self) -> str:
        return self.relative or str(self.source)


@dataclass
class Discovery:
    scans: list[Scan]
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # images left out, and why


def entities(path: Path) -> tuple[dict[str, str], str]:
    """A BIDS file name's entities (in order) and its suffix: ``sub-1_ses-2_T2w.nii.gz`` -> ({sub, ses}, T2w)."""
    *pairs, suffix = stem(path).split("_")
    found = {}
    for pair in pairs:
        match = _ENTITY.match(pair)
        if not match:
            raise InputError(f"{path}: '{pair}' is not a BIDS key-value entity")
        found[match.group(1)] = match.group(2)
    return found, suffix


def find_bids(root: Path, output: Path, participants: Sequence[str] = (), sessions: Sequence[str] = (),
              acquisitions: Sequence[str] = ()) -> Discovery:
    """The T2w images of a BIDS dataset, filtered, and their derivative paths under ``output``.

    Without ``acquisitions``, a session with a 3D SPACE T2w (``acq-`` containing "spc" or "space") and
    other T2w images keeps only the SPACE ones (the others are listed as skipped, with the reason).
    """
    root = Path(root)
    if not root.is_dir() or not any(root.glob("sub-*")):
        raise InputError(f"{root}: not a BIDS dataset (no sub-* folders)")
    wanted_subjects = {p.removeprefix("sub-") for p in participants}
    wanted_sessions = {s.removeprefix("ses-") for s in sessions}
    wanted_acq = {a.removeprefix("acq-") for a in acquisitions}
    images = sorted(p for pattern in ("sub-*/anat/*_T2w.nii*", "sub-*/ses-*/anat/*_T2w.nii*")
                    for p in root.glob(pattern) if p.name.endswith(_NIFTI))
    chosen: dict[tuple[str, str], list[tuple[Path, dict[str, str]]]] = {}
    skipped = []
    for image in images:
        found, _ = entities(image)
        subject, session = found.get("sub", ""), found.get("ses", "")
        if wanted_subjects and subject not in wanted_subjects:
            continue
        if wanted_sessions and session not in wanted_sessions:
            continue
        if wanted_acq and found.get("acq", "") not in wanted_acq:
            continue
        chosen.setdefault((subject, session), []).append((image, found))
    scans = []
    for (subject, session), group in sorted(chosen.items()):
        space = [any(marker in found.get("acq", "").lower() for marker in SPACE_MARKERS) for _, found in group]
        if not wanted_acq and any(space) and not all(space):
            skipped += [(image, "a 3D SPACE T2w of the same session is segmented instead (choose with --acq)")
                        for (image, _), is_space in zip(group, space) if not is_space]
            group = [item for item, is_space in zip(group, space) if is_space]
        for image, found in group:
            folder = output / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
            name = "_".join(f"{key}-{value}" for key, value in found.items())
            scans.append(Scan(image, folder / f"{name}_desc-lesion_mask.nii.gz",
                              folder / f"{name}_desc-lesion_probseg.nii.gz",
                              output / f"sub-{subject}" / "figures" / f"{name}_desc-lesion_mask.png",
                              subject, session, image.relative_to(root).as_posix()))
    return Discovery(scans, skipped)


def read_manifest(path: Path) -> Discovery:
    """A CSV with ``input,output`` columns (the label map's path); the other outputs go beside it."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read the manifest ({error})") from error
    if not rows or not {"input", "output"} <= set(rows[0]):
        raise InputError(f"{path}: a manifest needs a header with 'input' and 'output' columns and at least one row")
    base = path.parent
    scans = []
    for row in rows:
        source, mask = (Path(row[key]) if Path(row[key]).is_absolute() else base / row[key]
                        for key in ("input", "output"))
        name = stem(mask)
        scans.append(Scan(source, mask, mask.with_name(f"{name}_probseg.nii.gz"), mask.with_name(f"{name}.png")))
    return Discovery(scans)


def shard_of(scans: Sequence[Scan], shard: str | None, environ: dict[str, str] | None = None) -> list[Scan]:
    """Every N-th scan for shard ``i/N`` (0 ≤ i < N), else for this Slurm array task, else all."""
    environ = os.environ if environ is None else environ
    if shard is None and "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        values = {key: environ.get(key, "0").strip() for key in
                  ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")}
        bad = [f"{key}='{value}'" for key, value in values.items() if not value.isdigit()]
        if bad:
            raise InputError(f"{', '.join(bad)}: Slurm's array variables must be whole numbers (or pass --shard I/N)")
        first = int(values["SLURM_ARRAY_TASK_MIN"])
        shard = f"{int(values['SLURM_ARRAY_TASK_ID']) - first}/{values['SLURM_ARRAY_TASK_COUNT']}"
    if shard is None:
        return list(scans)
    match = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise InputError(f"--shard '{shard}': use I/N with 0 <= I < N (e.g. 0/4)")
    index, count = int(match.group(1)), int(match.group(2))
    return list(scans[index::count])


def stem(path: Path) -> str:
    name = Path(path).name
    for ext in (*_NIFTI, ".nrrd", ".mgz", ".mgh", ".json", ".png"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
