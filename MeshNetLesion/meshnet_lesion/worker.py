"""One segmentation in a child process, for a front end that must not run the network itself (the Slicer module).

Why a process: Slicer's main thread holds the GIL while its event loop idles, so a network run on a
thread inside Slicer gets Python time only in the slices the panel's timer hands over; a child
process runs at the command line's speed, can be stopped at once, and an out-of-memory crash ends
the child, not Slicer. The parent writes a request folder, starts the child (:func:`command`),
reads progress from the child's stdout and, after exit code 0, reads the result from the same
folder. Arrays travel as ``.npy`` (read with ``allow_pickle=False``), everything else as JSON.

Inside Slicer the child is started through ``PythonSlicer``, a launcher that forwards no signal
(``MeshNetLesionLib.launcher``): the child therefore reports its own process id first, and exits
by itself when its stdin closes (the parent cancelled, or died).

Request: ``request.json`` with ``action``: ``segment`` (the default: ``volume.npy`` (i, j, k),
``affine.npy``; ``request``, a :class:`~.request.SegmentationRequest` as JSON, and ``registry``),
``import`` (folder, id, title, registry: a model folder into the registry's cache) or ``devices``.
Result: for ``segment`` ``labels.npy``, ``brain.npy`` and ``probabilities.npy`` when there are
some, ``result.json``; for the others ``result.json`` alone. Stdout: lines ``MESHNET-WORKER {json}``
with one key, ``started`` {pid}, ``devices`` {kind: reason or null}, ``progress`` [fraction, stage],
``download`` [done, total, name], ``error`` {kind, message, detail} or ``done``; anything else the
child prints is log text.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from . import errors
from .request import SegmentationRequest
from .result import SegmentationResult
from .spec import ClassSpec
from .volume import Volume

PREFIX = "MESHNET-WORKER "
WATCH_STDIN = "--exit-when-stdin-closes"
ORPHANED_EXIT = 75   # the exit code of a child whose stdin closed before it finished
_ARRAYS = ("labels", "brain", "probabilities")


# ---------------------------------------------------------------------------------------- parent side
def write_request(folder: Path, volume: Volume, request: dict[str, Any]) -> None:
    np.save(folder / "volume.npy", np.ascontiguousarray(volume.array), allow_pickle=False)
    np.save(folder / "affine.npy", np.asarray(volume.affine, np.float64), allow_pickle=False)
    (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")


def command(python: str, folder: Path, package_root: str) -> list[str]:
    """The child's command line; ``package_root`` (the folder holding ``meshnet_lesion``) goes first on its
    path, so the child runs the same code as the parent whatever its launcher sets. The child exits when its
    stdin closes: the parent starts it with a pipe there and closes it to cancel."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from meshnet_lesion.worker import main; "
            "sys.exit(main(sys.argv[2:]))")
    return [python, "-c", code, package_root, str(folder), WATCH_STDIN]


def parse_line(line: str) -> tuple[str, Any] | None:
    """(kind, payload) for a message line, None for log text."""
    if not line.startswith(PREFIX):
        return None
    try:
        message = json.loads(line[len(PREFIX):])
        (kind, payload), = message.items()
    except ValueError:
        return None
    return kind, payload


def error_from(payload: dict[str, Any]) -> BaseException:
    """The child's error as the parent raises it: our own error classes by name, anything else as RuntimeError."""
    kind = getattr(errors, str(payload.get("kind")), None)
    if isinstance(kind, type) and issubclass(kind, errors.MeshNetLesionError):
        return kind(payload.get("message", ""))
    return RuntimeError(f"{payload.get('kind')}: {payload.get('message', '')}")


def read_result(folder: Path) -> SegmentationResult:
    fields = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) if (folder / f"{name}.npy").is_file()
              else None for name in _ARRAYS}
    fields["classes"] = tuple(ClassSpec(c["name"], tuple(c["color"])) for c in fields["classes"])
    fields["affine"] = np.asarray(fields["affine"], np.float64)
    return SegmentationResult(**arrays, **fields)


# ---------------------------------------------------------------------------------------- child side
def _send(kind: str, payload: Any = True) -> None:
    sys.stdout.write(PREFIX + json.dumps({kind: payload}) + "\n")
    sys.stdout.flush()


def _write_result(folder: Path, result: SegmentationResult) -> None:
    result.summarize()
    for name in _ARRAYS:
        array = getattr(result, name)
        if array is not None:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    fields = {k: v for k, v in vars(result).items() if k not in _ARRAYS}
    fields["affine"] = np.asarray(result.affine).tolist()
    fields["classes"] = [{"name": c.name, "color": list(c.color)} for c in result.classes]
    (folder / "result.json").write_text(json.dumps(fields), encoding="utf-8")


def _exit_when_stdin_closes() -> None:
    """End this process (at once, from a thread) when stdin reaches its end: the parent closed it or died."""
    def watch() -> None:
        try:  # the descriptor, not sys.stdin: a daemon thread blocked in a buffered read aborts interpreter shutdown
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _registry(job: dict[str, Any]):
    from .registry import Registry

    return Registry(**{k: v for k, v in job.get("registry", {}).items() if v is not None})


def _segment(folder: Path, job: dict[str, Any]) -> None:
    from .devices import available_devices
    from .pipeline import Segmenter

    volume = Volume(np.load(folder / "volume.npy", allow_pickle=False),
                    np.load(folder / "affine.npy", allow_pickle=False))
    wanted = SegmentationRequest.from_json(job["request"])
    segmenter = Segmenter.for_request(wanted, _registry(job),
                                      download_progress=lambda done, total, name: _send("download", [done, total, name]))
    _send("devices", available_devices())
    result = segmenter.segment(volume, probabilities=wanted.probabilities,
                               progress=lambda fraction, stage: _send("progress", [fraction, stage]))
    _write_result(folder, result)


def _import(folder: Path, job: dict[str, Any]) -> None:
    entry = _registry(job).import_folder(Path(job["folder"]), job.get("id"), job.get("title"))
    (folder / "result.json").write_text(json.dumps({"id": entry.id, "title": entry.title}), encoding="utf-8")


def _devices(folder: Path, job: dict[str, Any]) -> None:
    from .devices import available_devices

    (folder / "result.json").write_text(json.dumps({"devices": available_devices()}), encoding="utf-8")


ACTIONS = {"segment": _segment, "import": _import, "devices": _devices}


def run(folder: Path) -> None:
    from .devices import check_torch_version

    job = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    action = ACTIONS[job.get("action", "segment")]
    check_torch_version()
    action(folder, job)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if WATCH_STDIN in argv:
        argv.remove(WATCH_STDIN)
        _exit_when_stdin_closes()
    _send("started", {"pid": os.getpid()})
    folder = Path(argv[0])
    try:
        run(folder)
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
        _send("error", {"kind": type(error).__name__, "message": str(error),
                        "detail": "".join(traceback.format_exception(type(error), error, error.__traceback__))})
        return 1
    _send("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
