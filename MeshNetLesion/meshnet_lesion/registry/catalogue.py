"""The catalogue: registry entries (models and sample scans) read from ``models.json`` and from imported models'
cards. Each entry holds its files (pinned by SHA-256), its card (what people read: task, evidence, licence) and,
typed apart from the card, how its model runs (:class:`Runtime`)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

BUILTIN_REGISTRY = Path(__file__).resolve().parent.parent / "models.json"
SCHEMA_VERSION = 1
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RUNTIME_KEYS = ("members", "spec", "postprocess", "inference")   # the record's keys that become the Runtime
_INFERENCE_KEYS = {"mirror", "tile", "crop_margin"}


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    url: str | None = None
    size: int | None = None
    bundled: Path | None = None    # shipped with the extension, at this path


@dataclass(frozen=True)
class Runtime:
    """How an entry's model runs, as the pipeline reads it (the card's text apart)."""

    members: tuple[str, ...] = ()              # an ensemble's members, whose probabilities are averaged
    spec: Mapping[str, Any] = field(default_factory=dict)   # over the weights' own description: input convention,
    #                                            normalisation, landmarks, classes
    brain_mask: bool = False                   # restrict labels to the brain (and standardise) unless told not to
    largest_component: bool = False           # keep only the largest component (brainchop's tissue models)
    mirror: bool = False                       # also run the scan mirrored left to right (a lesion model)
    tile: int | None = None                    # run on tiles of this edge (a student distilled on crops of it)
    crop_margin: int | str | None = "auto"     # around the head: "auto" the pipeline's margin, None the whole grid

    @classmethod
    def from_record(cls, item: Mapping[str, Any], entry_id: str) -> Runtime:
        """From a registry record's ``members``, ``spec``, ``postprocess`` and ``inference``; refuses what cannot run."""
        postprocess, inference = item.get("postprocess") or {}, item.get("inference") or {}
        members, spec = item.get("members") or (), item.get("spec") or {}
        if not (isinstance(postprocess, Mapping) and isinstance(inference, Mapping) and isinstance(spec, Mapping)
                and isinstance(members, (list, tuple)) and all(isinstance(m, str) for m in members)):
            raise ModelError(f"registry entry {entry_id}: malformed members, spec, postprocess or inference")
        unknown = set(inference) - _INFERENCE_KEYS
        if unknown:
            raise ModelError(f"registry entry {entry_id}: unknown inference settings {sorted(unknown)}")
        tile = inference.get("tile")
        if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 16):
            raise ModelError(f"{entry_id}: its card's tile edge must be a whole number of voxels ≥ 16, not {tile!r}")
        margin = inference.get("crop_margin", "auto")
        if margin not in ("auto", None) and (not isinstance(margin, int) or margin < 0):
            raise ModelError(f"{entry_id}: its card's crop margin must be a number of voxels ≥ 0 or null")
        return cls(tuple(members), dict(spec), bool(postprocess.get("brain_mask", False)),
                   bool(postprocess.get("largest_component", False)), bool(inference.get("mirror", False)), tile,
                   margin)

    def as_record(self) -> dict[str, Any]:
        """The record's keys again (the registry's JSON, ``models show --json``)."""
        record: dict[str, Any] = {"postprocess": {"brain_mask": self.brain_mask,
                                                  "largest_component": self.largest_component}}
        if self.members:
            record["members"] = list(self.members)
        if self.spec:
            record["spec"] = dict(self.spec)
        inference = {key: value for key, value, default in (("mirror", self.mirror, False), ("tile", self.tile, None),
                                                            ("crop_margin", self.crop_margin, "auto"))
                     if value != default}
        if inference:
            record["inference"] = inference
        return record


@dataclass(frozen=True)
class Entry:
    """A registry entry: a model (its card and how it runs) or a sample scan."""

    id: str
    title: str
    kind: str                      # "model" or "sample"
    files: tuple[FileEntry, ...]
    card: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "builtin"        # "builtin" or "imported"
    runtime: Runtime = field(default_factory=Runtime)

    @property
    def task(self) -> str:
        return str(self.card.get("task", ""))


def entry_from_record(item: Mapping[str, Any], kind: str, origin: str, base: Path | None = None) -> Entry:
    try:
        entry_id = str(item["id"])
        files = []
        for f in item["files"]:
            bundled = f.get("bundled")
            if bundled is not None and (base is None or Path(bundled).is_absolute() or ".." in Path(bundled).parts):
                raise ModelError(f"registry entry {item['id']}: a shipped file must be a path inside the package")
            files.append(FileEntry(str(f["name"]), str(f["sha256"]).lower(), f.get("url"), f.get("size"),
                                   None if bundled is None else base / bundled))
        files = tuple(files)
    except (KeyError, TypeError) as error:
        raise ModelError(f"malformed registry entry {item.get('id', '?')}: missing {error}") from error
    if not ID_PATTERN.match(entry_id):
        raise ModelError(f"invalid registry id '{entry_id}'")
    for f in files:
        if not re.fullmatch(r"[0-9a-f]{64}", f.sha256) or "/" in f.name or f.name.startswith("."):
            raise ModelError(f"registry entry {entry_id}: bad file record {f.name}")
    card = {k: v for k, v in item.items() if k not in ("id", "title", "files", *RUNTIME_KEYS)}
    return Entry(entry_id, str(item.get("title", entry_id)), kind, files, card, origin,
                 Runtime.from_record(item, entry_id))


def read_catalogue(path: Path) -> dict[str, Entry]:
    """The built-in entries of a registry file (``models.json``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read the model registry {path}: {error}") from error
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ModelError(f"registry schema {data.get('schema_version')} is not supported (expected {SCHEMA_VERSION})")
    entries: dict[str, Entry] = {}
    for kind, items in (("model", data.get("models", [])), ("sample", data.get("samples", []))):
        for item in items:
            entry = entry_from_record(item, kind, "builtin", Path(path).parent)
            if entry.id in entries:
                raise ModelError(f"duplicate registry id {entry.id}")
            entries[entry.id] = entry
    return entries


def read_imported(folders: Iterable[Path]) -> tuple[dict[str, Entry], dict[str, str]]:
    """Imported models' cards (``<folder>/entry.json``), and the folders whose card cannot be read, with why."""
    entries, damaged = {}, {}
    for folder in folders:
        try:
            entry = entry_from_record(json.loads((folder / "entry.json").read_text(encoding="utf-8")), "model",
                                      "imported")
            if entry.id != folder.name:
                raise ModelError(f"its card names id '{entry.id}'")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ModelError, KeyError, TypeError,
                AttributeError) as error:
            damaged[folder.name] = str(error) or type(error).__name__  # listed, and removable by name
            continue
        entries[entry.id] = entry
    return entries, damaged


def entries_json(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [{"id": e.id, "title": e.title, "kind": e.kind, "origin": e.origin, **e.card,
             **(e.runtime.as_record() if e.kind == "model" else {}),
             "files": [{**vars(f), "bundled": None if f.bundled is None else str(f.bundled)} for f in e.files]}
            for e in entries]
