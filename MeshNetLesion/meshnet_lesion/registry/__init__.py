"""The model registry: model cards, files pinned by URL and SHA-256, cache, mirror, import, remove.

:mod:`.catalogue` reads the entries (``models.json``, imported models' cards), :mod:`.store` finds their files
(in order: the user cache, the files shipped with the extension, the folder named by
``MESHNET_LESION_MIRROR``, then a verified download), :mod:`.imports` adds and removes a user's models.
:class:`Registry` puts them together.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelError, UnknownModelError
from .catalogue import BUILTIN_REGISTRY, Entry, FileEntry, Runtime, entries_json, read_catalogue, read_imported
from .store import CACHE_ENV, MIRROR_ENV, DownloadProgress, FileStore, default_cache_dir, sha256_of

__all__ = ["BUILTIN_REGISTRY", "CACHE_ENV", "MIRROR_ENV", "DownloadProgress", "Entry", "FileEntry", "Registry",
           "Runtime", "default_cache_dir", "entries_json", "sha256_of"]


class Registry:
    """Model and sample entries, and where their files are on this machine.

    ``mirror``: a folder searched for the files before any download; None takes ``MESHNET_LESION_MIRROR``, ""
    means none. A mirror that is not a folder is an error when it is first searched."""

    def __init__(self, registry_path: Path | None = None, cache_dir: Path | None = None,
                 mirror: Path | str | None = None) -> None:
        self.registry_path = Path(registry_path or BUILTIN_REGISTRY)
        mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
        self.store = FileStore(Path(cache_dir) if cache_dir is not None else None,
                               Path(mirror).expanduser() if mirror else None)
        self._builtin = read_catalogue(self.registry_path)
        self._imported_memo: tuple[tuple, dict[str, Entry], dict[str, str]] | None = None

    @property
    def mirror(self) -> Path | None:
        return self.store.mirror

    @property
    def cache_dir(self) -> Path:
        return self.store.cache_dir

    def settings(self) -> dict[str, str | None]:
        """The constructor's arguments, for a registry in another process (None: that process's default)."""
        return {"registry_path": str(self.registry_path),
                "cache_dir": None if self.store.known_cache_dir is None else str(self.store.known_cache_dir),
                "mirror": None if self.mirror is None else str(self.mirror)}

    # ------------------------------------------------------------------ entries
    def builtin_ids(self) -> set[str]:
        return set(self._builtin)

    def damaged_imports(self) -> dict[str, str]:
        """Imported folders whose card cannot be read, by folder name, with the reason (remove them by name)."""
        return self._read_imported()[1]

    def _read_imported(self) -> tuple[dict[str, Entry], dict[str, str]]:
        """Imported models' cards, parsed again only when a folder or card was added, removed or changed."""
        root = self.cache_dir / "imported"
        try:
            folders = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
        except OSError:
            folders = []
        key = []
        for folder in folders:
            try:
                stat = (folder / "entry.json").stat()
                key.append((folder.name, stat.st_mtime_ns, stat.st_size))
            except OSError:
                key.append((folder.name, None, None))
        if self._imported_memo is None or self._imported_memo[0] != tuple(key):
            self._imported_memo = (tuple(key), *read_imported(folders))
        return self._imported_memo[1], self._imported_memo[2]

    def entries(self, kind: str | None = None) -> list[Entry]:
        everything = {**self._builtin, **self._read_imported()[0]}
        return [e for e in everything.values() if kind is None or e.kind == kind]

    def get(self, entry: Entry | str) -> Entry:
        """The entry of an id (an :class:`Entry` is returned as it is)."""
        if isinstance(entry, Entry):
            return entry
        everything = {**self._builtin, **self._read_imported()[0]}
        if entry not in everything:
            known = ", ".join(sorted(everything))
            raise UnknownModelError(f"unknown model id '{entry}' (known: {known})")
        return everything[entry]

    def builtin_entry(self, entry_id: str) -> Entry:
        """A built-in entry, without looking at the cache (works before any package is installed)."""
        if entry_id not in self._builtin:
            raise UnknownModelError(f"unknown built-in id '{entry_id}'")
        return self._builtin[entry_id]

    def default_model(self) -> Entry:
        for entry in self.entries("model"):
            if entry.card.get("default"):
                return entry
        raise ModelError("the registry names no default model")

    def members(self, entry: Entry | str) -> list[Entry]:
        """The models an entry runs: an ensemble's members (each a single model), or the entry itself."""
        entry = self.get(entry)
        if not entry.runtime.members:
            return [entry]
        members = [self.get(member) for member in entry.runtime.members]
        for member in members:
            if member.kind != "model" or member.runtime.members:
                raise ModelError(f"ensemble {entry.id}: member {member.id} must be a single model")
        return members

    # ------------------------------------------------------------------ files
    def locate(self, entry: Entry, file: FileEntry) -> Path | None:
        """The verified local copy of a file, or None (see :meth:`.store.FileStore.locate`)."""
        return self.store.locate(entry, file)

    def damaged_files(self, entry: Entry | str) -> list[str]:
        """Downloaded files of an entry (its members') that no longer match their SHA-256: fetching replaces them."""
        return [file.name for member in self.members(entry) for file in member.files
                if self.store.is_damaged(member, file)]

    def is_available(self, entry: Entry | str) -> bool:
        """True if every file of the entry (of every member, for an ensemble) is on this machine."""
        return all(self.locate(member, f) is not None for member in self.members(entry) for f in member.files)

    def download_size(self, entry: Entry | str) -> int:
        """Bytes of the entry's files (its members' for an ensemble), downloaded or not."""
        return sum(f.size or 0 for member in self.members(entry) for f in member.files)

    def fetch_all(self, entry: Entry | str, progress: DownloadProgress | None = None) -> list[Path]:
        """Local paths of every file an entry needs (its members' for an ensemble), downloading what is missing."""
        return [path for member in self.members(entry) for path in self.fetch(member, progress).values()]

    def fetch(self, entry: Entry | str, progress: DownloadProgress | None = None) -> dict[str, Path]:
        """Local paths of the files of a single entry, by file name, downloading what is missing."""
        entry = self.get(entry)
        if entry.runtime.members:
            raise ModelError(f"'{entry.id}' is an ensemble; fetch its members ({', '.join(entry.runtime.members)})")
        return {file.name: self.locate(entry, file) or self.store.download(entry, file, progress)
                for file in entry.files}

    def load(self, entry: Entry | str, progress: DownloadProgress | None = None):
        """Fetch and load a model into a :class:`~..spec.LoadedModel`."""
        from ..formats import load_model_files

        entry = self.get(entry)
        if entry.kind != "model":
            raise ModelError(f"'{entry.id}' is a sample scan, not a model")
        if entry.runtime.members:
            raise ModelError(f"'{entry.id}' is an ensemble; load its members ({', '.join(entry.runtime.members)})")
        return load_model_files(self.fetch(entry, progress), entry.runtime.spec)

    def clear_cache(self) -> None:
        """Delete every downloaded file (imported models are kept)."""
        self.store.clear()

    # ------------------------------------------------------------------ import / remove
    def import_folder(self, folder: Path, entry_id: str | None = None, title: str | None = None,
                      task: str = "lesion", card: Mapping[str, Any] | None = None) -> Entry:
        """Copy a local model folder into the cache as a new entry after loading it once to check it.

        The folder holds a brainchop ``model.json`` + ``model.pth``, a TensorFlow.js ``model.json``
        + ``.bin`` shards, one of our ``.safetensors`` files or a PyTorch checkpoint of the paper's
        MeshNet; only the files the model is read from are copied (a ``colormap.json`` among them).
        Links that leave the folder, and models too large to run here, are refused.
        """
        from .imports import import_folder

        return self.get(import_folder(self, folder, entry_id, title, task, card))

    def remove(self, entry: Entry | str) -> str:
        """Forget an imported model, or delete a built-in one's downloaded files; what was done, in a sentence."""
        from .imports import remove

        return remove(self, entry)
