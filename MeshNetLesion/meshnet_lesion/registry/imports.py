"""Models a user brings: a local folder copied into the cache with a card of its own, after it was loaded once to
check it; and removing them again. Only the files the model is read from are copied; links that leave the folder
and models that could never run here are refused."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..outputs import partial_path, remove_leftovers
from .catalogue import ID_PATTERN, Runtime
from .store import make_cache_folder, sha256_of

MODEL_SUFFIXES = (".json", ".bin", ".pth", ".pt", ".ckpt", ".safetensors")
# An import is refused beyond these: far above any MeshNet (150 thousand parameters, 2 GiB at 256³).
MAX_IMPORT_PARAMETERS = 50_000_000


def import_folder(registry, folder: Path, entry_id: str | None, title: str | None, task: str,
                  card: Mapping[str, Any] | None) -> str:
    """Copy ``folder`` into ``registry``'s cache as a new entry (see :meth:`.Registry.import_folder`); its id."""
    from ..formats import load_with_files

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"not a folder: {folder}")
    entry_id = entry_id or re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-")
    if not ID_PATTERN.match(entry_id):
        raise ModelError(f"invalid model id '{entry_id}' (lower-case letters, digits, '.', '_' and '-')")
    if entry_id in registry.builtin_ids():
        raise ModelError(f"'{entry_id}' is a built-in model id; choose another id")
    Runtime.from_record(card or {}, entry_id)          # how it is to run: refused here, before anything is copied
    loaded, used = load_with_files(model_files_in(folder), (card or {}).get("spec"))
    if task == "lesion" and loaded.spec.num_classes != 2:
        raise ModelError(f"a lesion model must have 2 classes, this one has {loaded.spec.num_classes}")
    check_plausible(loaded)
    destination = registry.cache_dir / "imported" / entry_id
    if entry_id in registry.damaged_imports():
        raise ModelError(f"a damaged import named '{entry_id}' is in the way; remove it first "
                         f"(meshnet-lesion models remove {entry_id})")
    if destination.exists():
        raise ModelError(f"a model with id '{entry_id}' is already imported; remove it first")
    make_cache_folder(destination.parent)
    remove_leftovers([destination.parent])
    staging = partial_path(destination)
    staging.mkdir()
    try:
        file_entries = []
        for name in used:
            shutil.copyfile(folder / name, staging / name)
            file_entries.append({"name": name, "sha256": sha256_of(staging / name),
                                 "size": (staging / name).stat().st_size})
        record = {"id": entry_id, "title": title or entry_id, "task": task, "files": file_entries,
                  "imported_from": str(folder.resolve()),
                  "description": f"Imported from {folder.name}; {loaded.spec.num_classes} classes, "
                                 f"{loaded.num_parameters:,} parameters.",
                  **{k: v for k, v in (card or {}).items() if k not in ("id", "files")}}
        record.setdefault("postprocess", {"brain_mask": task == "lesion", "largest_component": False})
        (staging / "entry.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return entry_id


def remove(registry, entry) -> str:
    """Forget an imported model (a damaged one by its folder name), or delete the downloaded files of a built-in
    one (every member's, for an ensemble). Returns what was done, in a sentence."""
    if isinstance(entry, str) and entry in registry.damaged_imports():
        shutil.rmtree(registry.cache_dir / "imported" / entry)
        return f"removed the damaged import {entry}"
    entry = registry.get(entry)
    for member in registry.members(entry):
        folder = registry.cache_dir / ("imported" if member.origin == "imported" else "files") / member.id
        if folder.exists():
            shutil.rmtree(folder)
    if entry.origin == "imported":
        return f"removed {entry.id}"
    return (f"{entry.id} is built in and cannot be removed; its downloaded files were deleted "
            "(they are fetched again when needed)")


def model_files_in(folder: Path) -> dict[str, Path]:
    """The files of a model folder a reader may use; a link that leaves the folder is refused."""
    root = folder.resolve()
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == "entry.json" or not path.name.endswith(MODEL_SUFFIXES):
            continue                                   # macOS ._* files, our own card, anything else
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ModelError(f"{path.name} is a link to {path.resolve()}, outside {folder}; copy the file "
                             "into the folder instead")
        if path.is_file():
            files[path.name] = path
    return files


def check_plausible(loaded) -> None:
    """Refuse a model that could never run here: too many parameters, or more memory than the machine has."""
    from ..engine import memory_estimate

    if loaded.num_parameters > MAX_IMPORT_PARAMETERS:
        raise ModelError(f"implausible model: {loaded.num_parameters:,} parameters (MeshNets have thousands to "
                         f"hundreds of thousands; at most {MAX_IMPORT_PARAMETERS:,} are accepted)")
    need = memory_estimate(loaded.spec)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        have = None
    if have and need > have:
        raise ModelError(f"this model needs about {need / 2 ** 30:.0f} GiB for a 256³ volume, more than this "
                         f"machine's {have / 2 ** 30:.0f} GiB")
