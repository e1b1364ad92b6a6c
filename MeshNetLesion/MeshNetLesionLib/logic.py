"""MeshNetLesionLogic, the module's public API: MRML nodes in, an editable "Lesion" segment out. No Qt.

Runs inside Slicer and headless with only the ``slicer-core`` package (tests build the scene the
way trame-slicer does). The widget drives a :class:`~.job.SegmentationJob` from a timer;
:meth:`MeshNetLesionLogic.segment` is the synchronous form for the Python console and batch scripts.
The network runs in a child process (:mod:`.job`), and so do importing a model and finding devices:
Slicer's own process never imports PyTorch, so the panel loads before PyTorch is installed.
"""
from __future__ import annotations

import html
import traceback
from pathlib import Path
from typing import Any

import slicer

from meshnet_lesion.errors import Cancelled, InputError
from meshnet_lesion.request import SegmentationRequest

from . import mrml
from .job import Launch, SegmentationJob, runAction
from .texts import _

MODULE_NAME = "MeshNetLesion"
SAMPLE_ID = "sample-arc-m2265-t2w"


class MeshNetLesionLogic:
    """Segment a scalar volume node into an editable "Lesion" segment with the MeshNetLesion core."""

    def __init__(self, scene=None, registry=None, terminologyLogic=None) -> None:
        self._scene = scene
        self._registry = registry
        self.terminologyLogic = terminologyLogic
        self.job: SegmentationJob | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def registry(self):
        if self._registry is None:
            from meshnet_lesion.registry import Registry

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

    def defaultInputVolume(self):
        """The most recently added scalar volume that is a scan, not a label map or one of our outputs."""
        nodes = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        candidates = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        candidates = [node for node in candidates if mrml.isInputCandidate(node)]
        return candidates[-1] if candidates else None

    def models(self) -> list:
        """Lesion models first (the default on top), then the others."""
        entries = self.registry.entries("model")
        default = self.defaultModelId()
        return sorted(entries, key=lambda e: (e.id != default, e.task != "lesion", e.title))

    def defaultModelId(self) -> str:
        return self.registry.default_model().id

    def defaultBrainMask(self, modelId: str) -> bool:
        """Whether a model restricts its labels to the brain unless told otherwise (on for lesion models)."""
        return self.registry.get(modelId).runtime.brain_mask

    def modelCard(self, modelId: str) -> dict[str, Any]:
        entry = self.registry.get(modelId)
        return {"id": entry.id, "title": entry.title, "origin": entry.origin,
                "available": self.registry.is_available(entry), "damaged": self.registry.damaged_files(entry),
                "download_mb": self.registry.download_size(entry) / 1e6, "default": entry.id == self.defaultModelId(),
                **entry.card}

    def sampleFile(self):
        """The ARC sample scan's registry file (name, URL, SHA-256), read without third-party packages."""
        return self.registry.builtin_entry(SAMPLE_ID).files[0]

    def importModelFolder(self, folder: str | Path, modelId: str | None = None, title: str | None = None):
        """Import a model folder into the registry's cache, checked by loading it in a child process (PyTorch is
        needed: call :func:`.install.ensureDependencies` first). Returns the new registry entry."""
        found = runAction(self.launch(), {"action": "import", "folder": str(Path(folder).resolve()), "id": modelId,
                                          "title": title})
        return self.registry.get(found["id"])

    def clearDownloadedModels(self) -> None:
        self.registry.clear_cache()

    def launch(self) -> Launch:
        """How a child process starts: which Python (``PythonSlicer`` in Slicer), this logic's registry, Slicer's
        temporary folder."""
        return Launch.here(self.registry.settings())

    # ---------------------------------------------------------------- running
    def segmentAsync(self, inputVolumeNode, outputSegmentationNode=None, modelId: str | None = None,
                     device: str = "auto", precision: str = "auto", brainMask: bool | None = None,
                     minimumLesionMl: float = 0.0, outputProbability: bool = False) -> SegmentationJob:
        """Start a run on a worker thread and return its job (the caller polls it on the main thread)."""
        if self.job is not None and not self.job.finished:
            raise RuntimeError("a segmentation is already running")
        request = SegmentationRequest(modelId or self.defaultModelId(), device=device, precision=precision,
                                      brain_mask=brainMask, min_lesion_ml=float(minimumLesionMl),
                                      probabilities=bool(outputProbability))
        if outputSegmentationNode is not None and not outputSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError("the output must be a segmentation node")
        self.job = SegmentationJob(self.scene, self.launch(), inputVolumeNode, outputSegmentationNode, request)
        return self.job

    def segment(self, inputVolumeNode, outputSegmentationNode=None, modelId: str | None = None,
                device: str = "auto", precision: str = "auto", brainMask: bool | None = None,
                minimumLesionMl: float = 0.0, outputProbability: bool = False,
                progressCallback=None):
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

    def showResult(self, job: SegmentationJob) -> None:
        """After a run: the input in the slice views' background, its probability map (if asked for) over it."""
        probability = None
        if job.request.probabilities and job.segmentationNode is not None:
            probability = job.segmentationNode.GetNodeReference(mrml.PROBABILITY_REFERENCE)
        mrml.showInSliceViews(self.scene, job.inputVolumeNode, probability)

    # ---------------------------------------------------------------- terminology and results
    def loadTerminology(self, terminologyLogic=None) -> str:
        """Load our terminology context (lesion = SNOMED CT Infarct) into Slicer's terminology logic."""
        return mrml.loadTerminology(terminologyLogic or self.terminologyLogic)

    @staticmethod
    def lesionSummary(segmentationNode) -> dict[str, str]:
        """What the last run stored on the segmentation (volume in mL, components, model, device)."""
        return mrml.lesionSummary(segmentationNode)


def errorDetails(job: SegmentationJob) -> str | None:
    """What a failure dialog shows under "Details": nothing for an expected error (bad input, a missing
    model), the child's traceback or last log lines otherwise."""
    from meshnet_lesion.errors import MeshNetLesionError

    if job.error is None or isinstance(job.error, MeshNetLesionError):
        return None
    if job.errorDetail:
        return job.errorDetail
    return "".join(traceback.format_exception(type(job.error), job.error, job.error.__traceback__)) or None


def measuredText(measured: dict[str, str] | None) -> str:
    """The card's own measurements in one line, and the result file in the repository that holds every figure."""
    if not measured:
        return ""
    return _("{summary} (every figure, with its command and machine: {results} in the repository)").format(
        summary=measured["summary"], results=measured["results"])


def modelCardHtml(card: dict[str, Any]) -> str:
    """The model card (:meth:`MeshNetLesionLogic.modelCard`) as the HTML the panel shows."""
    def figures(key: str) -> str:
        return "; ".join(f"{m['name']}: {m['value']}" for m in card.get(key) or [])

    metricText = figures("metrics") or card.get("metrics_note", _("none published"))
    state = (_("on this computer") if card["available"] else
             _("downloads {size:.1f} MB on first use").format(size=card["download_mb"]))
    if card.get("damaged"):  # never deleted behind the user's back: Apply downloads a verified copy over it
        state = _("the downloaded copy of {files} is damaged (SHA-256 mismatch); Apply downloads it again "
                  "({size:.1f} MB), or use 'Clear downloaded models'").format(
            files=", ".join(card["damaged"]), size=card["download_mb"])
    rows = [(_("Default model"), card.get("default_reason", _("yes")) if card.get("default") else ""),
            (_("Task"), card.get("task", "")), (_("Input"), card.get("input", "")),
            (_("Input convention"), card.get("input_convention", "")),
            (_("Trained on"), card.get("training_data", "")), (_("Known metrics"), metricText),
            (_("Measured by this project"), measuredText(card.get("measured"))),
            (_("License"), card.get("license", "")), (_("Files"), state)]
    text = "".join(f"<b>{name}:</b> {html.escape(str(value))}<br>" for name, value in rows if value)
    if card.get("source"):
        text += f'<a href="{card["source"]}">{html.escape(card["source"])}</a>'
    return text
