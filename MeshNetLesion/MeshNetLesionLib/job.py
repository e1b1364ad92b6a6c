"""One segmentation run on a worker thread, applied to the scene on the main thread.

The worker touches only numpy and torch (the core). Progress, the result or the error come back
through a queue; :meth:`SegmentationJob.poll` (main thread) applies them and, on success, creates
the nodes, so a failed or cancelled run leaves the scene as it was. Closing the scene or removing
the input or output node cancels the run.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import vtk

from meshnet_lesion.errors import Cancelled
from meshnet_lesion.progress import Progress, ProgressCallback

from . import mrml

_WRITE_SHARE = 0.04  # progress share of creating the nodes at the end


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked for (the panel's choices, or the arguments of ``segment``)."""

    modelId: str
    device: str = "auto"
    precision: str = "auto"
    brainMask: bool | None = None        # None: the model's own default
    minimumLesionMl: float = 0.0
    outputProbability: bool = False


class SegmentationJob:
    """One run; the main thread calls :meth:`poll` until it returns True.

    ``segmenter(options, downloadProgress)`` gives the core's Segmenter for the options; it is
    called on the worker thread (it may load weights or download them).
    """

    def __init__(self, scene, segmenter: Callable[..., Any], inputVolumeNode, outputSegmentationNode,
                 options: RunOptions) -> None:
        self.scene = scene
        self._segmenter = segmenter
        self.inputVolumeNode = inputVolumeNode
        self.outputSegmentationNode = outputSegmentationNode
        self.options = options
        self.state = "running"            # running | done | failed | cancelled
        self.segmentationNode = None
        self.result = None                # the core's SegmentationResult
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self.startTime = time.monotonic()
        self.elapsed = 0.0
        self._progress = Progress(self._notify)
        self._progress.stage = "starting"
        self._cancel = threading.Event()
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

    # ---------------------------------------------------------------- worker thread
    def _work(self) -> None:
        try:
            segmenter = self._segmenter(self.options, self._post_download)
            if self._cancel.is_set():
                raise Cancelled("segmentation was cancelled")
            result = segmenter.segment(self.volume, probabilities=self.options.outputProbability,
                                       progress=self._post_progress, cancel=self._cancel)
            self._messages.put(("result", result))
        except Cancelled:
            self._messages.put(("cancelled", None))
        except BaseException as error:  # noqa: BLE001 - every failure is reported to the main thread
            self._messages.put(("error", error))

    def _post_progress(self, fraction: float, stage: str) -> None:
        self._messages.put(("progress", (fraction * (1 - _WRITE_SHARE), stage)))

    def _post_download(self, done: int, total: int, name: str) -> None:
        text = f"downloading {name}" + (f" ({done / max(total, 1):.0%})" if total else "")
        self._messages.put(("progress", (0.0, text)))

    # ---------------------------------------------------------------- main thread
    def addProgressCallback(self, callback: ProgressCallback) -> None:
        self._callbacks.append(callback)

    def _notify(self, fraction: float, stage: str) -> None:
        for callback in self._callbacks:
            callback(fraction, stage)

    def cancel(self) -> None:
        """Ask the run to stop; it stops at the next layer or slab (well under 2 s on a CPU)."""
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Apply what the worker posted. Returns True once the job has finished (any state)."""
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
                self.error = payload
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

    def _complete(self, result) -> None:
        if self._cancel.is_set():
            self._finish("cancelled")
            return
        self._progress.report(1 - _WRITE_SHARE, "creating segments")
        try:
            self.segmentationNode = mrml.writeResult(self.scene, self.inputVolumeNode,
                                                     self.outputSegmentationNode, result, self.options.modelId,
                                                     self.options.outputProbability)
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
        for target, tag in self._observations:
            target.RemoveObserver(tag)
        self._observations.clear()
        self._thread.join(timeout=5)

    def _observe(self, target, event: int, method) -> None:
        self._observations.append((target, target.AddObserver(event, method)))

    def _onSceneClose(self, caller, event) -> None:
        self.cancel()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, caller, event, node) -> None:
        if node is not None and node in (self.inputVolumeNode, self.outputSegmentationNode):
            self.cancel()
