"""MeshNetLesionLogic: MRML nodes in, an editable "Lesion" segment out. No Qt.

Runs inside Slicer and headless with only the ``slicer-core`` package (tests build the scene the
way trame-slicer does). The core runs on numpy copies taken on the main thread; nodes are created
on the main thread only, after the run succeeded, so a failed or cancelled run leaves the scene as
it was. The widget drives :class:`SegmentationJob` from a timer; :meth:`MeshNetLesionLogic.segment`
is the synchronous form for the Python console and batch scripts.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from .errors import Cancelled, InputError, MeshNetLesionError
from .volume import Volume

MODULE_NAME = "MeshNetLesion"
LESION_SEGMENT_NAME = "Lesion"
LESION_COLOR = (0.9, 0.1, 0.1)
SEGMENT_TAG = "MeshNetLesion.Model"             # marks the segment this module owns (value: model id)
PROBABILITY_REFERENCE = "MeshNetLesion.Probability"
TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "MeshNetLesion.term.json"
TERMINOLOGY_CONTEXT = "Segmentation category and type - MeshNetLesion"
# SNOMED CT: category 49755003 "Morphologically altered structure", type 55641003 "Infarct",
# region 12738006 "Brain". Slicer's default lists have no infarct type, hence our own context.
LESION_TERMINOLOGY = (f"{TERMINOLOGY_CONTEXT}~SCT^49755003^Morphologically Altered Structure"
                      "~SCT^55641003^Infarct~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
_WRITE_SHARE = 0.04  # progress share of creating the nodes at the end

ProgressCallback = Callable[[float, str], None]


class SegmentationJob:
    """One segmentation run on a worker thread; the main thread calls :meth:`poll` until it returns True.

    The worker touches only numpy and torch. Progress, the result or the error come back through
    a queue; :meth:`poll` (main thread) applies them and, on success, creates the nodes.
    Closing the scene or removing the input or output node cancels the run.
    """

    def __init__(self, logic: "MeshNetLesionLogic", inputVolumeNode, outputSegmentationNode, options: dict) -> None:
        self.logic = logic
        self.inputVolumeNode = inputVolumeNode
        self.outputSegmentationNode = outputSegmentationNode
        self.options = options
        self.progress = 0.0
        self.stage = "starting"
        self.state = "running"            # running | done | failed | cancelled
        self.segmentationNode = None
        self.result = None                # the core's SegmentationResult
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self.startTime = time.monotonic()
        self.elapsed = 0.0
        self._cancel = threading.Event()
        self._messages: queue.Queue = queue.Queue()
        self._callbacks: list[ProgressCallback] = []
        self.volume = logic.volumeFromNode(inputVolumeNode, self.warnings)   # copy, on the main thread
        self._observations: list[tuple[Any, int]] = []
        scene = logic.scene
        self._observe(scene, scene.StartCloseEvent, self._onSceneClose)
        self._observe(scene, scene.NodeAboutToBeRemovedEvent, self._onNodeRemoved)
        self._thread = threading.Thread(target=self._work, name="MeshNetLesion", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- worker thread
    def _work(self) -> None:
        try:
            segmenter = self.logic.segmenter(self.options, self._post_download)
            if self._cancel.is_set():
                raise Cancelled("segmentation was cancelled")
            result = segmenter.segment(self.volume, probabilities=self.options["outputProbability"],
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

    def _report(self, fraction: float, stage: str) -> None:
        self.progress = max(self.progress, min(1.0, fraction))  # monotone
        self.stage = stage
        for callback in self._callbacks:
            callback(self.progress, stage)

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
                self._report(*payload)
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

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> "SegmentationJob":
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
        self._report(1 - _WRITE_SHARE, "creating segments")
        try:
            self.segmentationNode = self.logic.writeResult(self.inputVolumeNode, self.outputSegmentationNode, result,
                                                           self.options)
            self.result = result
            self.warnings += result.warnings
        except BaseException as error:  # noqa: BLE001
            self.error = error
            self._finish("failed")
            return
        self._report(1.0, "done")
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


class MeshNetLesionLogic:
    """Segment a scalar volume node into an editable "Lesion" segment with the MeshNetLesion core."""

    def __init__(self, scene=None, registry=None, terminologyLogic=None) -> None:
        self._scene = scene
        self._registry = registry
        self.terminologyLogic = terminologyLogic
        self._segmenters: dict[tuple, Any] = {}
        self._segmenterLock = threading.Lock()
        self.job: SegmentationJob | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def registry(self):
        if self._registry is None:
            from .registry import Registry

            self._registry = Registry()
        return self._registry

    # ---------------------------------------------------------------- parameters and models
    def getParameterNode(self):
        """The module's singleton vtkMRMLScriptedModuleNode (as ScriptedLoadableModuleLogic does)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node = self.scene.AddNode(node)
        if node.GetAttribute("ModuleName") != MODULE_NAME:
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    def models(self) -> list:
        """Lesion models first (the default on top), then the others."""
        entries = self.registry.entries("model")
        default = self.registry.default_model().id
        return sorted(entries, key=lambda e: (e.id != default, e.task != "lesion", e.title))

    def modelCard(self, modelId: str) -> dict[str, Any]:
        entry = self.registry.get(modelId)
        return {"id": entry.id, "title": entry.title, "origin": entry.origin, "available": self.registry.is_available(entry.id),
                "download_mb": entry.download_size / 1e6, **entry.card}

    def importModelFolder(self, folder: str | Path, modelId: str | None = None, title: str | None = None):
        return self.registry.import_folder(Path(folder), modelId, title)

    def clearDownloadedModels(self) -> None:
        self.registry.clear_cache()
        self._segmenters.clear()

    @staticmethod
    def deviceChoices() -> dict[str, str | None]:
        """Device kind -> None if usable, else why not (imports torch)."""
        from .engine import available_devices

        return available_devices()

    def segmenter(self, options: dict, downloadProgress=None):
        """A cached :class:`Segmenter` for these options (loading weights, downloading if needed)."""
        from .pipeline import Segmenter

        key = (options["modelId"], options["device"], options["precision"], options["brainMask"],
               options["minimumLesionMl"])
        with self._segmenterLock:
            if key not in self._segmenters:
                self._segmenters[key] = Segmenter(
                    options["modelId"], registry=self.registry, device=options["device"],
                    precision=options["precision"], brain_mask=options["brainMask"],
                    min_lesion_ml=options["minimumLesionMl"], download_progress=downloadProgress)
            return self._segmenters[key]

    # ---------------------------------------------------------------- running
    def segmentAsync(self, inputVolumeNode, outputSegmentationNode=None, modelId: str | None = None,
                     device: str = "auto", precision: str = "auto", brainMask: bool | None = None,
                     minimumLesionMl: float = 0.0, outputProbability: bool = False) -> SegmentationJob:
        """Start a run on a worker thread and return its job (the caller polls it on the main thread)."""
        if self.job is not None and not self.job.finished:
            raise RuntimeError("a segmentation is already running")
        options = {"modelId": modelId or self.registry.default_model().id, "device": device,
                   "precision": precision, "brainMask": brainMask, "minimumLesionMl": float(minimumLesionMl),
                   "outputProbability": bool(outputProbability)}
        if outputSegmentationNode is not None and not outputSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError("the output must be a segmentation node")
        self.job = SegmentationJob(self, inputVolumeNode, outputSegmentationNode, options)
        return self.job

    def segment(self, inputVolumeNode, outputSegmentationNode=None, modelId: str | None = None,
                device: str = "auto", precision: str = "auto", brainMask: bool | None = None,
                minimumLesionMl: float = 0.0, outputProbability: bool = False,
                progressCallback: ProgressCallback | None = None):
        """Segment synchronously; returns the segmentation node. Raises on failure or cancel."""
        job = self.segmentAsync(inputVolumeNode, outputSegmentationNode, modelId, device, precision, brainMask,
                                minimumLesionMl, outputProbability)
        if progressCallback is not None:
            job.addProgressCallback(progressCallback)
        job.wait()
        if job.state == "cancelled":
            raise Cancelled("segmentation was cancelled")
        if job.state == "failed":
            raise job.error
        return job.segmentationNode

    # ---------------------------------------------------------------- MRML in
    def volumeFromNode(self, volumeNode, warnings: list[str] | None = None) -> Volume:
        """A copy of the node's voxels and its IJK-to-world matrix (call on the main thread)."""
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("select a scalar volume as input")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{volumeNode.GetName()}' is a label map, not an MRI scan")
        image = volumeNode.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise InputError(f"'{volumeNode.GetName()}' has no voxels")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(f"'{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                             "a single-component scalar volume is needed")
        array = np.array(slicer.util.arrayFromVolume(volumeNode))  # (k, j, i), copied
        ijk_to_ras = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijk_to_ras)
        affine = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if parent.IsTransformToWorldLinear():
                to_world = vtk.vtkMatrix4x4()
                parent.GetMatrixTransformToWorld(to_world)
                affine = slicer.util.arrayFromVTKMatrix(to_world) @ affine
            elif warnings is not None:
                warnings.append("the input is under a non-linear transform; it was segmented in its local frame")
        return Volume.from_kji(array, affine)

    # ---------------------------------------------------------------- MRML out
    def writeResult(self, inputVolumeNode, outputSegmentationNode, result, options: dict):
        """Create or update the segmentation (and probability volume). All or nothing."""
        scene = self.scene
        created: list = []
        new_segment_id = None
        segmentation_node = outputSegmentationNode
        geometry_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        geometry_role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        saved_geometry = None
        if segmentation_node is not None:
            saved_geometry = (segmentation_node.GetSegmentation().GetConversionParameter(geometry_name),
                              segmentation_node.GetNodeReferenceID(geometry_role))
        try:
            if segmentation_node is None:
                segmentation_node = scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} lesion"))
                created.append(segmentation_node)
                segmentation_node.CreateDefaultDisplayNodes()
                segmentation_node.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolumeNode)
            segmentation = segmentation_node.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                segmentation.SetSourceRepresentationName(
                    slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
            else:
                segmentation_node.SetSourceRepresentationToBinaryLabelmap()
            previous = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                        if segmentation.GetNthSegment(i).HasTag(SEGMENT_TAG)]
            new_segment_id = (LESION_SEGMENT_NAME if segmentation.GetSegment(LESION_SEGMENT_NAME) is None
                              else segmentation.GenerateUniqueSegmentID(LESION_SEGMENT_NAME))
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(new_segment_id)
            labelmap = self._orientedImage(result.labels, inputVolumeNode)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap, segmentation_node, ids, None):
                raise MeshNetLesionError("Slicer could not import the lesion label map into the segmentation")
            segment = segmentation.GetSegment(new_segment_id)
            segment.SetName(LESION_SEGMENT_NAME)
            segment.SetColor(*LESION_COLOR)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segment.SetTag(segment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
            segment.SetTag(SEGMENT_TAG, options["modelId"])
            if previous:
                index = segmentation.GetSegmentIndex(previous[0])
                for segment_id in previous:
                    segmentation.RemoveSegment(segment_id)
                segmentation.SetSegmentIndex(new_segment_id, index)
            if options["outputProbability"]:
                self._writeProbability(inputVolumeNode, segmentation_node, result.probabilities, created)
            self._placeInStudy(inputVolumeNode, [segmentation_node, segmentation_node.GetNodeReference(
                PROBABILITY_REFERENCE) if options["outputProbability"] else None])
            for key, value in (("Model", options["modelId"]), ("LesionVolumeMl", f"{result.lesion_volume_ml:.3f}"),
                               ("LesionComponents", str(result.lesion_components)),
                               ("BrainVolumeMl", "" if result.brain is None else f"{result.brain_volume_ml:.1f}"),
                               ("Device", result.device)):
                segmentation_node.SetAttribute(f"MeshNetLesion.{key}", value)
            return segmentation_node
        except BaseException:
            if saved_geometry is not None:  # the user's segmentation goes back to how it was
                segmentation = segmentation_node.GetSegmentation()
                if new_segment_id and segmentation.GetSegment(new_segment_id) is not None:
                    segmentation.RemoveSegment(new_segment_id)
                segmentation.SetConversionParameter(geometry_name, saved_geometry[0])
                segmentation_node.SetNodeReferenceID(geometry_role, saved_geometry[1])
            for node in reversed(created):
                for index in range(node.GetNumberOfDisplayNodes() - 1, -1, -1):
                    scene.RemoveNode(node.GetNthDisplayNode(index))
                scene.RemoveNode(node)
            raise

    @staticmethod
    def _orientedImage(labels_ijk: np.ndarray, volumeNode):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*labels_ijk.shape)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        from vtkmodules.util.numpy_support import vtk_to_numpy

        vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(labels_ijk, np.uint8).ravel(order="F")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        image.SetImageToWorldMatrix(matrix)
        return image

    def _writeProbability(self, inputVolumeNode, segmentationNode, probability_ijk: np.ndarray, created: list) -> None:
        node = segmentationNode.GetNodeReference(PROBABILITY_REFERENCE)
        if node is None:
            node = self.scene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode",
                self.scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} lesion probability"))
            created.append(node)
            node.CreateDefaultDisplayNodes()
            segmentationNode.SetNodeReferenceID(PROBABILITY_REFERENCE, node.GetID())
        matrix = vtk.vtkMatrix4x4()
        inputVolumeNode.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(probability_ijk.transpose(2, 1, 0), np.float32))
        display = node.GetDisplayNode()
        if display is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)

    def _placeInStudy(self, inputVolumeNode, nodes: list) -> None:
        """Put new nodes beside the input in subject hierarchy (its study, or its parent folder)."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(inputVolumeNode))
        if not parent:
            return
        for node in nodes:
            if node is None:
                continue
            item = hierarchy.GetItemByDataNode(node)
            if not item:
                item = hierarchy.CreateItem(parent, node)
            hierarchy.SetItemParent(item, parent)

    # ---------------------------------------------------------------- terminology and results
    def loadTerminology(self, terminologyLogic=None) -> str:
        """Load our terminology context (lesion = SNOMED CT Infarct) into Slicer's terminology logic."""
        terminologyLogic = terminologyLogic or self.terminologyLogic
        if terminologyLogic is None:
            return ""
        names = vtk.vtkStringArray()  # GetLoadedTerminologyNames(vtkStringArray*) exists in 5.8 and later
        terminologyLogic.GetLoadedTerminologyNames(names)
        if TERMINOLOGY_CONTEXT in {names.GetValue(i) for i in range(names.GetNumberOfValues())}:
            return TERMINOLOGY_CONTEXT
        name = terminologyLogic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
        if not name:
            logging.warning("MeshNetLesion: could not load %s", TERMINOLOGY_FILE)
        return name

    @staticmethod
    def lesionSummary(segmentationNode) -> dict[str, str]:
        """What the last run stored on the segmentation (volume in mL, components, model, device)."""
        keys = ("Model", "LesionVolumeMl", "LesionComponents", "BrainVolumeMl", "Device")
        return {k: segmentationNode.GetAttribute(f"MeshNetLesion.{k}") or "" for k in keys} if segmentationNode else {}
