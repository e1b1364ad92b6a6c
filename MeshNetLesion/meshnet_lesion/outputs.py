"""Writing files so that nothing is lost: partial files beside their targets, renamed only when complete.

- Every file is first written as ``.partial-<pid>-<random>-<name>`` in its target's folder (same
  file system, so the rename is atomic), with the permissions any other program's output gets (the
  umask), then renamed over the target.
- :func:`atomic_file` does that for one file; :class:`OutputSet` for all outputs of one input
  together: nothing is renamed until every one of them has been written, so a failure leaves
  earlier results as they were.
- :func:`remove_leftovers` deletes partial files whose process is gone (a killed run).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError

PARTIAL_PREFIX = ".partial-"
_PARTIAL = re.compile(r"^\.partial-(\d+)-")


def partial_path(target: Path) -> Path:
    """A fresh partial name beside ``target`` that keeps its suffix (file formats are told by the name)."""
    return target.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}")


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:   # thread-safe where it exists
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(partial: Path, target: Path) -> Path:
    """Give ``partial`` ordinary permissions (0666 less the umask) and rename it over ``target``."""
    os.chmod(partial, 0o666 & ~_umask())
    os.replace(partial, target)
    return target


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A partial path to write ``target`` to: published when the block ends normally, removed in any case."""
    partial = partial_path(Path(target))
    try:
        yield partial
        publish(partial, Path(target))
    finally:
        partial.unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """Raise :class:`InputError` unless a file can be created in ``folder`` (tried, then removed)."""
    if not folder.is_dir():
        raise InputError(f"folder does not exist: {folder}")
    try:
        handle, probe = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-probe-", dir=folder)
    except OSError as error:
        raise InputError(f"cannot write to {folder}: {error.strerror or error}") from error
    os.close(handle)
    os.unlink(probe)


class OutputSet:
    """The outputs of one input: staged as partial files, published together by :meth:`commit`.

    Used as a context manager, an exception discards every partial file and leaves the targets
    (earlier results) untouched.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, target: Path) -> Path:
        partial = partial_path(Path(target))
        self._staged.append((partial, Path(target)))
        return partial

    def commit(self) -> list[Path]:
        published = [publish(partial, target) for partial, target in self._staged]
        self._staged.clear()
        return published

    def discard(self) -> None:
        for partial, _ in self._staged:
            partial.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.discard()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                     # someone else's process, or no way to tell: keep its files
    return True


def remove_leftovers(folders: Iterable[Path]) -> int:
    """Delete partial files (and partial folders) in ``folders`` whose writing process no longer runs."""
    import shutil

    removed = 0
    for folder in {Path(f) for f in folders}:
        try:
            names = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:
            continue
        for path in names:
            found = _PARTIAL.match(path.name)
            if found and not _alive(int(found.group(1))):
                try:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed += 1
                except OSError:
                    pass
    return removed
