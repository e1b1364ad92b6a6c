"""The model registry: model cards, files pinned by URL and SHA-256, cache, mirror, import, remove.

A file is looked for, in order, in the user cache (and its hash checked), beside the registry when
the entry ships it with the extension (``"bundled": "weights/<file>"``, hash checked too), in the directory named
by ``MESHNET_LESION_MIRROR`` (searched recursively for the file name with the right SHA-256; an
offline site or CI points it at a copy of the files), and only then downloaded (by pooch: to a
temporary file beside the destination, verified, then renamed, so a file in the cache is always
whole and correct). Models a user imports from a folder live in the cache with their own card.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import IntegrityError, ModelError, UnknownModelError
from .outputs import partial_path, publish, remove_leftovers

BUILTIN_REGISTRY = Path(__file__).with_name("models.json")
MIRROR_ENV = "MESHNET_LESION_MIRROR"
CACHE_ENV = "MESHNET_LESION_CACHE"
SCHEMA_VERSION = 1
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

DownloadProgress = Callable[[int, int, str], None]  # (bytes done, bytes total, file name)


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    url: str | None = None
    size: int | None = None
    bundled: Path | None = None    # shipped with the extension, at this path


@dataclass(frozen=True)
class Entry:
    """A registry entry: a model (with its card) or a sample scan."""

    id: str
    title: str
    kind: str                      # "model" or "sample"
    files: tuple[FileEntry, ...]
    card: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "builtin"        # "builtin" or "imported"

    @property
    def task(self) -> str:
        return str(self.card.get("task", ""))

    @property
    def spec_overrides(self) -> Mapping[str, Any]:
        return self.card.get("spec", {})

    @property
    def postprocess(self) -> Mapping[str, Any]:
        return self.card.get("postprocess", {})

    @property
    def member_ids(self) -> tuple[str, ...]:
        """The entries an ensemble averages (its card's ``members``); empty for a single model."""
        return tuple(self.card.get("members", ()))


def default_cache_dir() -> Path:
    """``MESHNET_LESION_CACHE``, else the platform's user cache folder (the one platformdirs and
    pooch.os_cache choose), worked out here so that listing models needs no third-party package."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "meshnet-lesion" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "meshnet-lesion"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshnet-lesion"


def _make_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(f"cannot write to the model cache {folder}: {error.strerror or error}; set {CACHE_ENV} to a "
                         "folder you can write to") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Registry:
    """Model and sample entries, and where their files are on this machine.

    ``mirror``: a folder searched for the files before any download; None takes ``MESHNET_LESION_MIRROR``, ""
    means none. A mirror that is not a folder is an error when it is first searched."""

    def __init__(self, registry_path: Path | None = None, cache_dir: Path | None = None,
                 mirror: Path | str | None = None) -> None:
        self.registry_path = Path(registry_path or BUILTIN_REGISTRY)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
        self.mirror = Path(mirror).expanduser() if mirror else None
        self._builtin = self._read_builtin()
        self._imported_memo: tuple[tuple, dict[str, Entry], dict[str, str]] | None = None
        self._mirror_index: dict[str, list[Path]] | None = None
        self._hash_memo: dict[tuple[str, int, int], str] = {}

    def settings(self) -> dict[str, str | None]:
        """The constructor's arguments, for a registry in another process (None: that process's default)."""
        return {"registry_path": str(self.registry_path),
                "cache_dir": None if self._cache_dir is None else str(self._cache_dir),
                "mirror": None if self.mirror is None else str(self.mirror)}

    @property
    def cache_dir(self) -> Path:
        """Resolved on first use, so reading the registry needs no third-party package."""
        if self._cache_dir is None:
            self._cache_dir = default_cache_dir()
        return self._cache_dir

    # ------------------------------------------------------------------ entries
    def _read_builtin(self) -> dict[str, Entry]:
        try:
            data = json.loads(self.registry_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"cannot read the model registry {self.registry_path}: {error}") from error
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelError(f"registry schema {data.get('schema_version')} is not supported (expected {SCHEMA_VERSION})")
        entries: dict[str, Entry] = {}
        for kind, items in (("model", data.get("models", [])), ("sample", data.get("samples", []))):
            for item in items:
                entry = _entry_from_dict(item, kind, "builtin", self.registry_path.parent)
                if entry.id in entries:
                    raise ModelError(f"duplicate registry id {entry.id}")
                entries[entry.id] = entry
        return entries

    def _imported(self) -> dict[str, Entry]:
        return self._read_imported()[0]

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
        if self._imported_memo is not None and self._imported_memo[0] == tuple(key):
            return self._imported_memo[1], self._imported_memo[2]
        entries, damaged = {}, {}
        for folder in folders:
            try:
                entry = _entry_from_dict(json.loads((folder / "entry.json").read_text(encoding="utf-8")), "model",
                                         "imported")
                if entry.id != folder.name:
                    raise ModelError(f"its card names id '{entry.id}'")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, ModelError, KeyError, TypeError,
                    AttributeError) as error:
                damaged[folder.name] = str(error) or type(error).__name__  # listed, and removable by name
                continue
            entries[entry.id] = entry
        self._imported_memo = (tuple(key), entries, damaged)
        return entries, damaged

    def entries(self, kind: str | None = None) -> list[Entry]:
        everything = {**self._builtin, **self._imported()}
        return [e for e in everything.values() if kind is None or e.kind == kind]

    def get(self, entry: Entry | str) -> Entry:
        """The entry of an id (an :class:`Entry` is returned as it is)."""
        if isinstance(entry, Entry):
            return entry
        everything = {**self._builtin, **self._imported()}
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

    # ------------------------------------------------------------------ files
    def _cached_path(self, entry: Entry, file: FileEntry) -> Path:
        folder = "imported" if entry.origin == "imported" else "files"
        return self.cache_dir / folder / entry.id / file.name

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_memo:
            self._hash_memo[key] = sha256_of(path)
        return self._hash_memo[key]

    def _from_mirror(self, file: FileEntry) -> Path | None:
        if self.mirror is None:
            return None
        if not self.mirror.is_dir():
            kind = "a file" if self.mirror.exists() else "missing"
            raise ModelError(f"{MIRROR_ENV} names {self.mirror}, which is {kind}, not a folder: point it at the "
                             "folder holding the model files, or unset it to download them")
        if self._mirror_index is None:
            self._mirror_index = _index_folder(self.mirror)
        for candidate in self._mirror_index.get(file.name, []):
            try:
                if file.size is not None and candidate.stat().st_size != file.size:
                    continue
                if self._hash(candidate) == file.sha256:
                    return candidate
            except OSError:       # vanished, unreadable or a dangling link: not a copy of the file
                continue
        return None

    def locate(self, entry: Entry, file: FileEntry) -> Path | None:
        """The verified local copy of a file (cache, then mirror), or None; downloads and deletes nothing.

        A damaged cached copy is passed over (see :meth:`damaged_files`); a download replaces it atomically."""
        cached = self._cached_path(entry, file)
        if cached.is_file():
            if self._hash(cached) == file.sha256:
                return cached
            if entry.origin == "imported":
                raise IntegrityError(f"imported file {cached} was modified (SHA-256 mismatch)")
        if file.bundled is not None and file.bundled.is_file():
            if self._hash(file.bundled) != file.sha256:
                raise IntegrityError(f"{entry.id}: the shipped file {file.bundled} does not match its SHA-256; "
                                     "reinstall the extension")
            return file.bundled
        return self._from_mirror(file)

    def members(self, entry: Entry | str) -> list[Entry]:
        """The models an entry runs: an ensemble's members (each a single model), or the entry itself."""
        entry = self.get(entry)
        if not entry.member_ids:
            return [entry]
        members = [self.get(member) for member in entry.member_ids]
        for member in members:
            if member.kind != "model" or member.member_ids:
                raise ModelError(f"ensemble {entry.id}: member {member.id} must be a single model")
        return members

    def damaged_files(self, entry: Entry | str) -> list[str]:
        """Downloaded files of an entry (its members') that no longer match their SHA-256: fetching replaces them."""
        damaged = []
        for member in self.members(entry):
            for file in member.files:
                cached = self._cached_path(member, file)
                if member.origin != "imported" and cached.is_file() and self._hash(cached) != file.sha256:
                    damaged.append(file.name)
        return damaged

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
        if entry.member_ids:
            raise ModelError(f"'{entry.id}' is an ensemble; fetch its members ({', '.join(entry.member_ids)})")
        paths = {}
        for file in entry.files:
            path = self.locate(entry, file)
            if path is None:
                path = self._download(entry, file, progress)
            paths[file.name] = path
        return paths

    def _download(self, entry: Entry, file: FileEntry, progress: DownloadProgress | None) -> Path:
        if not file.url:
            raise ModelError(f"{entry.id}: {file.name} is not on this machine and has no download URL")
        import pooch

        target = self._cached_path(entry, file)
        _make_cache_folder(target.parent)
        remove_leftovers([target.parent])
        staging = partial_path(target.with_name("download"))   # pooch's own temporary file goes in here
        bar: Any = _CallbackBar(progress, file.name) if progress else False
        try:
            staging.mkdir()
            pooch.retrieve(file.url, known_hash=f"sha256:{file.sha256}", fname=file.name, path=staging,
                           progressbar=bar)
            publish(staging / file.name, target)
        except ValueError as error:  # pooch's hash mismatch; it has removed the download already
            raise IntegrityError(f"{entry.id}: downloaded {file.name} does not match its SHA-256 "
                                 f"({file.url})") from error
        except Exception as error:
            reason = " ".join(str(error).split())[:160] or type(error).__name__
            where = f"the mirror {self.mirror}" if self.mirror else f"no mirror ({MIRROR_ENV} is not set)"
            raise ModelError(f"{entry.id}: {file.name} is not on this machine and could not be downloaded from "
                             f"{file.url} ({reason}). Looked in the cache {self.cache_dir} and {where}. Offline? "
                             f"Set {MIRROR_ENV} to a folder holding {file.name} (any depth), or copy it to "
                             f"{target}.") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def load(self, entry: Entry | str, progress: DownloadProgress | None = None):
        """Fetch and load a model into a :class:`~.spec.LoadedModel`."""
        from .formats import load_model_files

        entry = self.get(entry)
        if entry.kind != "model":
            raise ModelError(f"'{entry.id}' is a sample scan, not a model")
        if entry.member_ids:
            raise ModelError(f"'{entry.id}' is an ensemble; load its members ({', '.join(entry.member_ids)})")
        return load_model_files(self.fetch(entry, progress), entry.spec_overrides)

    # ------------------------------------------------------------------ import / remove
    def import_folder(self, folder: Path, entry_id: str | None = None, title: str | None = None,
                      task: str = "lesion", card: Mapping[str, Any] | None = None) -> Entry:
        """Copy a local model folder into the cache as a new entry after loading it once to check it.

        The folder holds a brainchop ``model.json`` + ``model.pth``, a TensorFlow.js ``model.json``
        + ``.bin`` shards, one of our ``.safetensors`` files or a PyTorch checkpoint of the paper's
        MeshNet; only the files the model is read from are copied (a ``colormap.json`` among them).
        Links that leave the folder, and models too large to run here, are refused.
        """
        from .formats import load_with_files

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"not a folder: {folder}")
        entry_id = entry_id or re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-")
        if not _ID_PATTERN.match(entry_id):
            raise ModelError(f"invalid model id '{entry_id}' (lower-case letters, digits, '.', '_' and '-')")
        if entry_id in self._builtin:
            raise ModelError(f"'{entry_id}' is a built-in model id; choose another id")
        loaded, used = load_with_files(_model_files_in(folder), (card or {}).get("spec"))
        if task == "lesion" and loaded.spec.num_classes != 2:
            raise ModelError(f"a lesion model must have 2 classes, this one has {loaded.spec.num_classes}")
        _check_plausible(loaded)
        destination = self.cache_dir / "imported" / entry_id
        if entry_id in self.damaged_imports():
            raise ModelError(f"a damaged import named '{entry_id}' is in the way; remove it first "
                             f"(meshnet-lesion models remove {entry_id})")
        if destination.exists():
            raise ModelError(f"a model with id '{entry_id}' is already imported; remove it first")
        _make_cache_folder(destination.parent)
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
        return self.get(entry_id)

    def remove(self, entry: Entry | str) -> str:
        """Forget an imported model (a damaged one by its folder name), or delete the downloaded files of a
        built-in one (every member's, for an ensemble). Returns what was done, in a sentence."""
        if isinstance(entry, str) and entry in self.damaged_imports():
            shutil.rmtree(self.cache_dir / "imported" / entry)
            return f"removed the damaged import {entry}"
        entry = self.get(entry)
        for member in self.members(entry):
            folder = self.cache_dir / ("imported" if member.origin == "imported" else "files") / member.id
            if folder.exists():
                shutil.rmtree(folder)
        if entry.origin == "imported":
            return f"removed {entry.id}"
        return (f"{entry.id} is built in and cannot be removed; its downloaded files were deleted "
                "(they are fetched again when needed)")

    def clear_cache(self) -> None:
        """Delete every downloaded file (imported models are kept). A download running at the same time may
        re-create its folder; that is retried, then reported."""
        files = self.cache_dir / "files"
        for attempt in range(3):
            try:
                shutil.rmtree(files)
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if attempt == 2:
                    raise ModelError(f"could not clear {files}: {error.strerror or error} (is a download "
                                     "running? try again when it has finished)") from error
                time.sleep(0.2)


MODEL_SUFFIXES = (".json", ".bin", ".pth", ".pt", ".ckpt", ".safetensors")
# An import is refused beyond these: far above any MeshNet (150 thousand parameters, 2 GiB at 256³).
MAX_IMPORT_PARAMETERS = 50_000_000


def _model_files_in(folder: Path) -> dict[str, Path]:
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


def _check_plausible(loaded) -> None:
    """Refuse a model that could never run here: too many parameters, or more memory than the machine has."""
    from .engine import memory_estimate

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


def _index_folder(root: Path, max_folders: int = 100_000) -> dict[str, list[Path]]:
    """Every file name below ``root`` (links followed, each real folder once, so link loops end)."""
    index: dict[str, list[Path]] = {}
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending and len(seen) < max_folders:
        folder = pending.pop()
        try:
            stat = folder.stat()
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            children = list(os.scandir(folder))
        except OSError:
            continue
        for child in children:
            try:
                if child.is_dir():             # follows links; a dangling one is neither dir nor file
                    pending.append(Path(child.path))
                elif child.is_file():
                    index.setdefault(child.name, []).append(Path(child.path))
            except OSError:
                continue
    return index


def _entry_from_dict(item: Mapping[str, Any], kind: str, origin: str, base: Path | None = None) -> Entry:
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
    if not _ID_PATTERN.match(entry_id):
        raise ModelError(f"invalid registry id '{entry_id}'")
    for f in files:
        if not re.fullmatch(r"[0-9a-f]{64}", f.sha256) or "/" in f.name or f.name.startswith("."):
            raise ModelError(f"registry entry {entry_id}: bad file record {f.name}")
    card = {k: v for k, v in item.items() if k not in ("id", "title", "files")}
    return Entry(entry_id, str(item.get("title", entry_id)), kind, files, card, origin)


class _CallbackBar:
    """The part of tqdm's interface pooch uses, forwarding to a (done, total, name) callback."""

    def __init__(self, callback: DownloadProgress, name: str) -> None:
        self.callback, self.name, self.total, self.done = callback, name, 0, 0

    def update(self, amount: int) -> None:
        self.done += amount
        self.callback(self.done, self.total, self.name)

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        pass


def entries_json(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [{"id": e.id, "title": e.title, "kind": e.kind, "origin": e.origin, **e.card,
             "files": [{**vars(f), "bundled": None if f.bundled is None else str(f.bundled)} for f in e.files]}
            for e in entries]
