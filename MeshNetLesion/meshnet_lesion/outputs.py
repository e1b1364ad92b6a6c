"""Writing files so that nothing is lost: partial files beside their targets, renamed only when complete.

- Every file is first written as ``.partial-<pid>-<random><format suffix>`` in its target's folder
  (same file system, so the rename is atomic; a short name, so any valid target name works), with
  the permissions any other program's output gets (the umask), then renamed over the target.
- Only a regular file (or nothing) is ever replaced: a device, FIFO, socket, symbolic link or folder
  standing at a target's path is refused, before any computation (:func:`check_target`) and again
  at the rename (:func:`publish`), so no output mode can skip it.
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
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError, OutputError

PARTIAL_PREFIX = ".partial-"
_PARTIAL = re.compile(r"^\.partial-(\d+)-")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _format_suffix(name: str) -> str:
    """The suffix a file's format is told by: ``.nii.gz`` for ``x.v2.nii.gz``, ``.json`` for ``x.json``."""
    suffixes = Path(name).suffixes
    return "".join(suffixes[-2:]) if len(suffixes) > 1 and suffixes[-1].lower() == ".gz" else "".join(suffixes[-1:])


def partial_path(target: Path) -> Path:
    """A fresh, short partial name beside ``target`` that keeps its format suffix (formats are told by the name)."""
    return target.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{_format_suffix(target.name)}")


def is_partial(path: Path) -> bool:
    return bool(_PARTIAL.match(Path(path).name))


def kind_of(path: Path) -> str | None:
    """What stands at ``path`` when it is not a regular file ("a FIFO (named pipe)", …); None for a regular file or
    nothing at all. A symbolic link is named as such, whatever it points to."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"unreachable ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_target(path: Path, role: str = "output") -> None:
    """Refuse an output path that could not take a regular file: something other than a regular file stands there,
    or its name (or the partial name written first) is too long for its folder's file system."""
    path = Path(path)
    limit = _name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise InputError(f"{role} {path.name[:40]}…: the name is {len(os.fsencode(path.name))} bytes, longer than "
                         f"this file system allows ({limit}); nothing was run, nothing was written")
    kind = kind_of(path)
    if kind is not None:
        raise InputError(f"{role} {path} is {kind}, not a regular file; only a regular file is ever replaced "
                         "(nothing was run, nothing was written)")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):   # Windows has no pathconf
        return 255


def file_identity(path: Path) -> tuple:
    """What makes two paths the same file: the file itself if it exists (hard and symbolic links too), else the
    resolved path."""
    try:
        found = Path(path).stat()
        return ("file", found.st_dev, found.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


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
    """Give ``partial`` ordinary permissions (0666 less the umask) and rename it over ``target``, which must be a
    regular file or nothing (checked again here, at the last moment)."""
    kind = kind_of(target)
    if kind is not None:
        raise OutputError(f"{target} is {kind}, not a regular file; it was left as it is and the result discarded")
    os.chmod(partial, 0o666 & ~_umask())
    os.replace(partial, target)
    return target


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A partial path to write ``target`` to: published when the block ends normally, removed in any case. A target
    that is itself a partial file (staged by :class:`OutputSet`) is written as it is."""
    if is_partial(target):
        yield Path(target)
        return
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (someone else's, or no way to tell: yes)."""
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
            if found and not process_alive(int(found.group(1))):
                try:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed += 1
                except OSError:
                    pass
    return removed
