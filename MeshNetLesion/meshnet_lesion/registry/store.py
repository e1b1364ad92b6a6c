"""Where an entry's files are on this machine: the user cache, the extension's shipped files, the mirror folder,
or, last, a download by URL (by pooch: to a temporary folder beside the destination, verified by SHA-256, then
renamed, so a file in the cache is always whole and correct)."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import IntegrityError, ModelError
from ..outputs import partial_path, publish, remove_leftovers
from .catalogue import Entry, FileEntry

MIRROR_ENV = "MESHNET_LESION_MIRROR"
CACHE_ENV = "MESHNET_LESION_CACHE"
DownloadProgress = Callable[[int, int, str], None]  # (bytes done, bytes total, file name)


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


def make_cache_folder(folder: Path) -> None:
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


class FileStore:
    """The cache, the mirror and downloads for one registry; hashes are remembered by (path, size, mtime)."""

    def __init__(self, cache_dir: Path | None, mirror: Path | None) -> None:
        self._cache_dir = cache_dir
        self.mirror = mirror
        self._mirror_index: dict[str, list[Path]] | None = None
        self._hash_memo: dict[tuple[str, int, int], str] = {}

    @property
    def known_cache_dir(self) -> Path | None:
        """The cache folder if given or already resolved (None: the default, not looked up yet)."""
        return self._cache_dir

    @property
    def cache_dir(self) -> Path:
        """Resolved on first use, so reading the registry needs no third-party package."""
        if self._cache_dir is None:
            self._cache_dir = default_cache_dir()
        return self._cache_dir

    def cached_path(self, entry: Entry, file: FileEntry) -> Path:
        folder = "imported" if entry.origin == "imported" else "files"
        return self.cache_dir / folder / entry.id / file.name

    def hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_memo:
            self._hash_memo[key] = sha256_of(path)
        return self._hash_memo[key]

    def from_mirror(self, file: FileEntry) -> Path | None:
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
                if self.hash(candidate) == file.sha256:
                    return candidate
            except OSError:       # vanished, unreadable or a dangling link: not a copy of the file
                continue
        return None

    def locate(self, entry: Entry, file: FileEntry) -> Path | None:
        """The verified local copy of a file (cache, shipped, then mirror), or None; downloads and deletes nothing.

        A damaged cached copy is passed over (see :meth:`is_damaged`); a download replaces it atomically."""
        cached = self.cached_path(entry, file)
        if cached.is_file():
            if self.hash(cached) == file.sha256:
                return cached
            if entry.origin == "imported":
                raise IntegrityError(f"imported file {cached} was modified (SHA-256 mismatch)")
        if file.bundled is not None and file.bundled.is_file():
            if self.hash(file.bundled) != file.sha256:
                raise IntegrityError(f"{entry.id}: the shipped file {file.bundled} does not match its SHA-256; "
                                     "reinstall the extension")
            return file.bundled
        return self.from_mirror(file)

    def is_damaged(self, entry: Entry, file: FileEntry) -> bool:
        """A downloaded copy that no longer matches its SHA-256 (fetching replaces it)."""
        cached = self.cached_path(entry, file)
        return entry.origin != "imported" and cached.is_file() and self.hash(cached) != file.sha256

    def download(self, entry: Entry, file: FileEntry, progress: DownloadProgress | None) -> Path:
        if not file.url:
            raise ModelError(f"{entry.id}: {file.name} is not on this machine and has no download URL")
        import pooch

        target = self.cached_path(entry, file)
        make_cache_folder(target.parent)
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

    def clear(self) -> None:
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
