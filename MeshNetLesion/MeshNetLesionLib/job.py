"""One segmentation run in a child process, applied to the scene on the main thread.

The network runs in a child Python (:mod:`meshnet_lesion.worker`; Slicer's ``PythonSlicer`` inside Slicer):
Slicer's main thread holds the GIL while its event loop idles, so a network on a thread inside
Slicer ran only in the slices the panel's timer handed over (``lab/benchmarks/slicer_gil.py`` measures
both); a child process runs at the command line's speed, stops at once on Cancel and takes an
out-of-memory crash with it instead of Slicer. A light thread here writes the request, starts the
child (:mod:`.launcher`: through ``PythonSlicer``, which forwards no signal) and relays its progress
through a queue; :meth:`SegmentationJob.poll` (main thread) applies them and, on success, creates
the nodes, so a failed or cancelled run leaves the scene as it was. Closing the scene or removing
the input or output node cancels the run.
"""
from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vtk

from meshnet_lesion.progress import Progress, ProgressCallback
from meshnet_lesion.request import SegmentationRequest

from . import launcher, mrml

_WRITE_SHARE = 0.04  # progress share of creating the nodes at the end
# The panel polls a job every POLL_INTERVAL_MS and then sleeps WORKER_SLICE_S. Slicer's main thread
# holds the GIL while idle in the Qt event loop, so the job's relay thread runs Python code only while
# the main thread sleeps here; the child process runs regardless.
POLL_INTERVAL_MS = 50
WORKER_SLICE_S = 0.01
_LOG_LINES = 40        # the child's last log lines, kept for an error's details
# What a child that ended without a word most likely met; the launcher turns a signal into exit code 1.
KILLED_HINT = ("it was stopped from outside before it finished: most often the computer ran out of memory (close "
               "other programs, or choose a smaller model or the CPU), or it crashed")


@dataclass(frozen=True)
class Launch:
    """How to start the child: the Python to run it with, the registry it should use, where its request goes
    (Slicer's temporary folder in the application; None: the system's)."""

    python: str
    registry: dict[str, str | None] = field(default_factory=dict)
    temporaryRoot: str | None = None

    @classmethod
    def here(cls, registry: dict[str, str | None]) -> Launch:
        return cls(launcher.pythonExecutable(), registry, launcher.temporaryRoot())


def _childFailure(code: int, log: deque[str]) -> tuple[RuntimeError, str | None]:
    """The error for a child that ended with ``code`` without reporting an error of its own."""
    return (RuntimeError(f"the segmentation process ended with exit code {code}; {KILLED_HINT}"),
            "\n".join(log) or None)


def runAction(launch: Launch, request: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run a short worker action (``import``, ``devices``) in a child and return its ``result.json``; raises the
    child's error. Blocks the caller: for actions of seconds, not for a segmentation."""
    from meshnet_lesion import worker

    package_root = str(Path(worker.__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="meshnet-lesion-", dir=launch.temporaryRoot) as folder:
        (Path(folder) / "request.json").write_text(json.dumps({**request, "registry": launch.registry}),
                                                   encoding="utf-8")
        process = launcher.start(worker.command(launch.python, Path(folder), package_root))
        timer = threading.Timer(timeout, launcher.stop, args=(process,))   # stdin stays open until then
        timer.start()
        try:
            output = process.stdout.read()
            process.wait()
        finally:
            timedOut = not timer.is_alive()
            timer.cancel()
            process.stdin.close()
        if timedOut:
            raise RuntimeError(f"the {request.get('action')} process did not finish in {timeout:.0f} s")
        log: deque[str] = deque(maxlen=_LOG_LINES)
        for line in output.splitlines():
            message = worker.parse_line(line)
            if message is None:
                log.append(line)
            elif message[0] == "error":
                raise worker.error_from(message[1])
        if process.returncode != 0:
            raise _childFailure(process.returncode, log)[0]
        return json.loads((Path(folder) / "result.json").read_text(encoding="utf-8"))


class SegmentationJob:
    """One run; the main thread calls :meth:`poll` until it returns True."""

    def __init__(self, scene, launch: Launch, inputVolumeNode, outputSegmentationNode,
                 request: SegmentationRequest) -> None:
        self.scene = scene
        self.launch = launch
        self.inputVolumeNode = inputVolumeNode
        self.outputSegmentationNode = outputSegmentationNode
        self.request = request
        self.state = "running"            # running | done | failed | cancelled
        self.segmentationNode = None
        self.result = None                # the core's SegmentationResult
        self.error: BaseException | None = None
        self.errorDetail: str | None = None   # the child's traceback or last log lines, for a dialog's details
        self.warnings: list[str] = []
        self.startTime = time.monotonic()
        self.elapsed = 0.0
        self._progress = Progress(self._notify)
        self._progress.stage = "starting"
        self._cancel = threading.Event()
        self.devices: dict[str, str | None] | None = None   # what the child found: device kind -> None or why not
        self._process: subprocess.Popen | None = None
        self._workerPid: int | None = None
        self._processLock = threading.Lock()
        self._log: deque[str] = deque(maxlen=_LOG_LINES)
        self._messages: queue.Queue = queue.Queue()
        self._callbacks: list[ProgressCallback] = []
        self.volume = mrml.volumeFromNode(inputVolumeNode, self.warnings)   # copy, on the main thread
        self._observations: list[tuple[Any, int]] = []
        self._observe(scene, scene.StartCloseEvent, self._onSceneClose)
        self._observe(scene, scene.NodeAboutToBeRemovedEvent, self._onNodeRemoved)
        self._thread = threading.Thread(target=self._work, name="MeshNetLesion", daemon=True)
        self._thread.start()

    @property
    def progress(self) -> float:
        return self._progress.fraction

    @property
    def stage(self) -> str:
        return self._progress.stage

    # ---------------------------------------------------------------- relay thread
    def _work(self) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="meshnet-lesion-", dir=self.launch.temporaryRoot) as folder:
                self._messages.put(self._run(Path(folder)))
        except BaseException as error:  # noqa: BLE001 - every failure is reported to the main thread
            self._messages.put(("cancelled", None) if self._cancel.is_set() else ("error", (error, None)))

    def _run(self, folder: Path) -> tuple[str, Any]:
        from meshnet_lesion import worker

        worker.write_request(folder, self.volume, {"request": self.request.to_json(), "registry": self.launch.registry})
        self.volume = None  # the child has its copy
        package_root = str(Path(worker.__file__).resolve().parent.parent)
        with self._processLock:
            if self._cancel.is_set():
                return "cancelled", None
            self._process = launcher.start(worker.command(self.launch.python, folder, package_root))
        failure = None
        for line in self._process.stdout:
            message = worker.parse_line(line)
            if message is None:
                self._log.append(line.rstrip())
            elif message[0] == "started":
                with self._processLock:
                    self._workerPid = int(message[1]["pid"])
                    if self._cancel.is_set():   # cancelled before the worker's id was known
                        launcher.stop(self._process, self._workerPid)
            elif message[0] == "devices":
                self.devices = message[1]
            elif message[0] == "progress":
                fraction, stage = message[1]
                self._messages.put(("progress", (fraction * (1 - _WRITE_SHARE), stage)))
            elif message[0] == "download":
                done, total, name = message[1]
                text = f"downloading {name}" + (f" ({done / max(total, 1):.0%})" if total else "")
                self._messages.put(("progress", (0.0, text)))
            elif message[0] == "error":
                failure = message[1]
        code = self._process.wait()
        self._process.stdin.close()
        if self._cancel.is_set():
            return "cancelled", None
        if failure is not None:
            return "error", (worker.error_from(failure), failure.get("detail"))
        if code != 0:
            return "error", _childFailure(code, self._log)
        return "result", worker.read_result(folder)

    # ---------------------------------------------------------------- main thread
    def addProgressCallback(self, callback: ProgressCallback) -> None:
        self._callbacks.append(callback)

    def _notify(self, fraction: float, stage: str) -> None:
        for callback in self._callbacks:
            callback(fraction, stage)

    def cancel(self) -> None:
        """Stop the run: the launcher, the worker under it and anything they started (killed if still there
        after a second; see :func:`.launcher.stop`)."""
        self._cancel.set()
        with self._processLock:
            process, workerPid = self._process, self._workerPid
            if process is not None:
                launcher.stop(process, workerPid)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Apply what the relay thread posted. Returns True once the job has finished (any state)."""
        if self.finished:
            return True
        self.elapsed = time.monotonic() - self.startTime
        while True:
            try:
                kind, payload = self._messages.get_nowait()
            except queue.Empty:
                return False
            if kind == "progress":
                self._progress.report(*payload)
            elif kind == "result":
                self._complete(payload)
                return True
            elif kind == "cancelled":
                self._finish("cancelled")
                return True
            else:
                self.error, self.errorDetail = payload
                self._finish("failed")
                return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> SegmentationJob:
        """Block the calling (main) thread until the job finishes, polling as the widget's timer does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("segmentation did not finish in time")
            time.sleep(interval)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Cancel if running, wait for the relay thread (at most ``timeout``) and drop the scene observers."""
        if not self.finished:
            self.cancel()
            deadline = time.monotonic() + timeout
            while not self.poll() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._removeObservers()
        self._thread.join(timeout=max(0.0, timeout))

    def _complete(self, result) -> None:
        if self._cancel.is_set():
            self._finish("cancelled")
            return
        self._progress.report(1 - _WRITE_SHARE, "creating segments")
        try:
            self.segmentationNode = mrml.writeResult(self.scene, self.inputVolumeNode,
                                                     self.outputSegmentationNode, result, self.request.model_id,
                                                     self.request.probabilities)
            self.result = result
            self.warnings += result.warnings
        except BaseException as error:  # noqa: BLE001
            self.error = error
            self._finish("failed")
            return
        self._progress.report(1.0, "done")
        self._finish("done")

    def _finish(self, state: str) -> None:
        self.state = state
        self.elapsed = time.monotonic() - self.startTime
        self._removeObservers()
        self._thread.join(timeout=5)

    def _removeObservers(self) -> None:
        for target, tag in self._observations:
            target.RemoveObserver(tag)
        self._observations.clear()

    def _observe(self, target, event: int, method) -> None:
        self._observations.append((target, target.AddObserver(event, method)))

    def _onSceneClose(self, caller, event) -> None:
        self.cancel()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, caller, event, node) -> None:
        if node is not None and node in (self.inputVolumeNode, self.outputSegmentationNode):
            self.cancel()
