"""MeshNetLesion: chronic stroke lesion segmentation on T2-weighted MRI with MeshNet, in 3D Slicer.

A thin module file over MeshNetLesionLib (Slicer-side logic) and meshnet_lesion (the core): the
widget shows the panel and drives a :class:`MeshNetLesionLib.job.SegmentationJob` from a timer.
The network runs in a child process; Slicer's process never imports torch.
"""
import logging
import os
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MeshNetLesionLib import texts
from MeshNetLesionLib.install import dependenciesMissing, ensureDependencies
from MeshNetLesionLib.job import POLL_INTERVAL_MS, WORKER_SLICE_S
from MeshNetLesionLib.logic import MeshNetLesionLogic, errorDetails, modelCardHtml

SAMPLE_NAME = "MeshNetLesionARC"
DOCUMENTATION_URL = "https://github.com/MeshNetLesion/SlicerMeshNetLesion#readme"
APPLY_DEBOUNCE_S = 0.5      # clicks on Apply/Cancel closer than this are one click
JOB_CLOSE_TIMEOUT_S = 5.0


class MeshNetLesion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MeshNet Lesion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MeshNetLesion developers (MeshNetLesion project)"]
        self.parent.helpText = _(
            "Segments chronic stroke lesions on T2-weighted brain MRI with MeshNet, a dilated 3D network "
            "of a few thousand to 150 thousand parameters. Select a T2 volume and a model, click Apply, "
            "then review and correct the 'Lesion' segment in Segment Editor. Research use only: not for "
            "clinical use.")
        self.parent.helpText += " " + _('See the <a href="{url}">documentation</a>.').format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "MeshNet: Fedorov et al., State-of-the-Art Stroke Lesion Segmentation at 1/1000th of Parameters "
            "(2025). Default model: the paper's MeshNet-26 trained on the Aphasia Recovery Cohort (Gibson et "
            "al., Sci Data 2024) by an independent replication (The-Obstacle-Is-The-Way/arc-meshchop). Other "
            "ARC models: T2lesion and brainchop (brainchop/NiiVue developers). Brain extraction: MindGrab "
            "(brainchop). ")
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    registerSampleData()
    try:
        MeshNetLesionLogic(terminologyLogic=slicer.modules.terminologies.logic()).loadTerminology()
    except AttributeError:  # Terminologies module disabled
        logging.warning("MeshNetLesion: Terminologies module not available; lesion terminology not loaded")


def registerSampleData():
    """The ARC sample scan, with the URL and SHA-256 of the model registry's entry."""
    import SampleData

    file = MeshNetLesionLogic().sampleFile()
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer 5.12+
        logic.registerCustomSampleDataCategory("MeshNetLesion", title=_("MeshNet Lesion"))
    logic.registerCustomSampleDataSource(
        category="MeshNetLesion", sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "SampleARC.png"),
        uris=file.url, fileNames=file.name, nodeNames=file.name.split(".")[0],
        checksums=f"SHA256:{file.sha256}", loadFileTypes="VolumeFile")


@parameterNodeWrapper
class MeshNetLesionParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""            # bound by hand: the model list comes from the registry at run time
    device: str = "auto"         # bound by hand: which devices exist is known only once PyTorch is here
    restrictToBrain: bool = True
    minimumLesionMl: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    outputProbability: bool = False


class MeshNetLesionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. It reads and writes the parameter node and asks the logic to do everything else."""

    DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "CUDA"), ("mps", "MPS"))

    def __init__(self, parent=None, logic=None):
        # Set before the base class runs: without a parent it calls setup() from its __init__.
        self.logic = logic          # injectable, so the widget can be driven with any logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._updatingGui = False
        self._devicesKnown = False
        self._lastApplyClick = 0.0
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MeshNetLesion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            terminologies = getattr(slicer.modules, "terminologies", None)  # None if the module is disabled
            self.logic = MeshNetLesionLogic(terminologyLogic=terminologies.logic() if terminologies else None)
        self.logic.loadTerminology()  # again here: a module reload does not rerun startupCompleted

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.clearModelsButton.connect("clicked(bool)", self.onClearModels)

        self.populateModels()
        self.populateDevices(None)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self):
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.close(timeout=JOB_CLOSE_TIMEOUT_S)  # cancels a running job, joins its thread, drops observers
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # A running segmentation keeps running; the timer keeps polling it.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)  # the logic's job cancels itself when the scene closes

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(MeshNetLesionParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            volume = self.logic.defaultInputVolume()
            if volume is not None:
                self._parameterNode.inputVolume = volume
        if not self._parameterNode.modelId:
            self._parameterNode.modelId = self.logic.defaultModelId()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            self._selectData(self.ui.modelComboBox, self._parameterNode.modelId)
            self._selectData(self.ui.deviceComboBox, self._parameterNode.device)
            self.showModelCard()
            self.showResults()
            running = self._job is not None and not self._job.finished
            if running:
                self.ui.applyButton.text = _("Cancel")
                self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene.")
                self.ui.applyButton.enabled = True
            else:
                self.ui.applyButton.text = _("Apply")
                ready = bool(self._parameterNode.inputVolume and self._parameterNode.modelId)
                self.ui.applyButton.enabled = ready
                self.ui.applyButton.toolTip = (_("Segment the lesion") if ready else
                                               _("Select an input volume and a model"))
            for widget in (self.ui.inputsCollapsibleButton, self.ui.optionsCollapsibleButton,
                           self.ui.outputsCollapsibleButton, self.ui.modelsCollapsibleButton):
                widget.enabled = not running
        finally:
            self._updatingGui = False

    @staticmethod
    def _selectData(comboBox, value):
        index = comboBox.findData(value)
        if index >= 0 and comboBox.currentIndex != index:
            comboBox.setCurrentIndex(index)

    # ---------------------------------------------------------------- models and devices
    def populateModels(self):
        current = self._parameterNode.modelId if self._parameterNode else None
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        default = self.logic.defaultModelId()
        for index, entry in enumerate(self.logic.models()):
            self.ui.modelComboBox.addItem(texts.modelLabel(entry, entry.id == default), entry.id)
            self.ui.modelComboBox.setItemData(index, texts.modelToolTip(entry), qt.Qt.ToolTipRole)
        self.ui.modelComboBox.blockSignals(False)
        if current:
            self._selectData(self.ui.modelComboBox, current)

    def populateDevices(self, reasons):
        """Disable devices this machine lacks, with the reason. Only a run's child process can tell (``reasons``,
        device kind -> None or why not; None before the first run): Slicer's process never imports PyTorch."""
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)  # clear()/addItem() emit currentIndexChanged: not a user's choice
        combo.clear()
        reasons = reasons or {}
        for index, (value, label) in enumerate(self.DEVICES):
            reason = reasons.get(value)
            combo.addItem(label if reason is None else _("{device} (not available)").format(device=label), value)
            if reason:
                item = combo.model().item(index)
                item.setEnabled(False)
                item.setToolTip(reason)
        self._devicesKnown = bool(reasons)
        combo.toolTip = "" if reasons else _("Which devices this computer has is known after the first run; then "
                                             "unavailable devices are disabled here. Auto is a CUDA GPU, else the CPU.")
        if self._parameterNode is not None:
            self._selectData(combo, self._parameterNode.device)
        combo.blockSignals(wasBlocked)

    def onModelChanged(self, index):
        if self._parameterNode is None or self._updatingGui or index < 0:
            return
        modelId = self.ui.modelComboBox.itemData(index)
        if modelId != self._parameterNode.modelId:
            wasModifying = self._parameterNode.StartModify()
            self._parameterNode.modelId = modelId
            # each model brings its own default for the brain restriction (on for lesion models)
            self._parameterNode.restrictToBrain = self.logic.defaultBrainMask(modelId)
            self._parameterNode.EndModify(wasModifying)

    def onDeviceChanged(self, index):
        if self._parameterNode is None or self._updatingGui or index < 0:
            return
        self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def showModelCard(self):
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        if not modelId:
            self.ui.modelCardLabel.text = ""
            return
        try:
            card = self.logic.modelCard(modelId)
        except Exception as error:  # an imported model whose files were removed
            self.ui.modelCardLabel.text = str(error)
            return
        self.ui.modelCardLabel.text = modelCardHtml(card)

    # ---------------------------------------------------------------- running
    def onApplyButton(self):
        now = time.monotonic()
        if now - self._lastApplyClick < APPLY_DEBOUNCE_S:  # a double-click must not start and cancel a run
            return
        self._lastApplyClick = now
        if self._job is not None and not self._job.finished:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling…")
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.ensureDependencies():
                return
            parameters = self._parameterNode
            self._job = self.logic.segmentAsync(
                parameters.inputVolume, parameters.outputSegmentation, modelId=parameters.modelId,
                device=parameters.device, brainMask=parameters.restrictToBrain,
                minimumLesionMl=parameters.minimumLesionMl, outputProbability=parameters.outputProbability)
            self._job.addProgressCallback(self.onProgress)
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Starting…")
            self._timer.start()
            self.updateGuiFromParameterNode()

    def ensureDependencies(self) -> bool:
        """Install what a run needs after asking, saying so on the status line while pip works."""
        missing = dependenciesMissing()
        if missing:
            self.ui.statusLabel.text = _("Installing {packages} (first use; this can take minutes)…").format(
                packages=", ".join(missing))
            slicer.app.processEvents()
        installed = ensureDependencies(askConfirmation=True)
        if missing:
            self.ui.statusLabel.text = _("Installed.") if installed else _("Not installed.")
        return installed

    def onTimer(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        if job.poll():
            self._timer.stop()
            self.onJobFinished(job)
        else:
            self.ui.statusLabel.text = texts.statusText(job.stage, job.elapsed)
            time.sleep(WORKER_SLICE_S)  # hand the GIL to the job's relay thread (see job.POLL_INTERVAL_MS)

    def onProgress(self, fraction, stage):
        self.ui.progressBar.value = int(round(fraction * 100))
        self.ui.statusLabel.text = texts.statusText(stage, self._job.elapsed if self._job else 0.0)

    def onJobFinished(self, job):
        self.ui.progressBar.setVisible(False)
        if job.devices is not None and not self._devicesKnown:
            self.populateDevices(job.devices)
        if job.state == "done":
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}.").format(
                seconds=job.elapsed, device=job.result.device)
            self.logic.showResult(job)
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = job.segmentationNode
            for warning in job.warnings:
                logging.warning("MeshNetLesion: %s", warning)
        elif job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            message = _("Segmentation failed: {error}").format(error=job.error)
            detail = errorDetails(job)
            if detail:  # PythonQt would show details of None as the text "None"
                slicer.util.errorDisplay(message, detailedText=detail)
            else:
                slicer.util.errorDisplay(message)
        self.updateGuiFromParameterNode()

    # ---------------------------------------------------------------- results
    def onOutputChanged(self, node):
        self.ui.segmentationShow3DButton.setSegmentationNode(node)
        self.showResults()

    def showResults(self):
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        self.ui.resultLabel.text = texts.resultText(self.logic.lesionSummary(node))
        self.ui.editInSegmentEditorButton.enabled = bool(node)

    def onEditInSegmentEditor(self):
        """Open Segment Editor with this segmentation and the input volume as source."""
        segmentation = self._parameterNode.outputSegmentation
        volume = self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if volume is not None:
            editor.setSourceVolumeNode(volume)

    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder to import"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the model."), waitCursor=True):
            if not self.ensureDependencies():  # the import loads the model (in a child process) to check it
                return
            entry = self.logic.importModelFolder(folder)
            self.populateModels()
            self._parameterNode.modelId = entry.id
            slicer.util.infoDisplay(_("Imported '{title}'.").format(title=entry.title))

    def onClearModels(self):
        if not slicer.util.confirmOkCancelDisplay(_("Delete all downloaded model files? They are downloaded "
                                                    "again when needed; imported models are kept.")):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not clear the model cache.")):
            self.logic.clearDownloadedModels()
            self.showModelCard()


class MeshNetLesionTest(ScriptedLoadableModuleTest):
    """Runs in Slicer, on the CPU: segment the ARC sample, cancel a run, re-run beside a user segment."""

    def setUp(self):
        # ctest (slicer_add_python_unittest) runs the test_* methods without runTest: on a machine without
        # PyTorch they are skipped with the reason instead of failing or installing behind anyone's back.
        missing = dependenciesMissing()
        if missing:
            self.skipTest(f"MeshNetLesion needs {', '.join(missing)}; run the self-test from the module "
                          "(Reload and Test) to install them")
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Reload and Test: installs what is missing after the user agrees, then runs every test. In testing mode
        (``--testing``), where Slicer's dialogs accept by themselves, nothing is installed: it fails naming what
        is missing."""
        if slicer.app.testingEnabled():
            missing = dependenciesMissing()
            self.assertFalse(missing, f"MeshNetLesion needs {', '.join(missing)}; install them first (Apply once in "
                                      "the module): testing mode installs nothing")
        else:
            self.assertTrue(ensureDependencies(askConfirmation=True), "dependencies are not installed")
        for test in (self.test_SegmentSample, self.test_CancelLeavesNoNodes, self.test_RerunKeepsUserSegment):
            self.setUp()
            test()

    def loadSample(self):
        import SampleData

        registerSampleData()
        return SampleData.downloadSample(SAMPLE_NAME)

    def lesionArray(self, segmentationNode, volumeNode):
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
        self.assertTrue(segmentId, "no segment named Lesion")
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)

    def test_SegmentSample(self):
        self.delayDisplay("Segmenting the ARC sample on the CPU (a few minutes)")
        volume = self.loadSample()
        seen = []
        segmentation = MeshNetLesionLogic().segment(volume, device="cpu", progressCallback=lambda f, s: seen.append(f))
        lesion = self.lesionArray(segmentation, volume)
        self.assertEqual(lesion.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertGreater(int(lesion.sum()), 60000)  # 82.0 mL at 1 mm³ with the default model
        self.assertEqual(seen, sorted(seen))
        self.assertEqual(seen[-1], 1.0)
        self.delayDisplay("Sample segmented")

    def test_CancelLeavesNoNodes(self):
        volume = self.loadSample()
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = MeshNetLesionLogic().segmentAsync(volume, modelId="t2lesion-meshnet11", device="cpu", brainMask=False)
        job.addProgressCallback(lambda fraction, stage: job.cancel() if fraction > 0.05 else None)
        job.wait()
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Cancel left the scene unchanged")

    def test_RerunKeepsUserSegment(self):
        volume = self.loadSample()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.GetSegmentation().AddEmptySegment("user", "User segment")
        logic = MeshNetLesionLogic()
        logic.segment(volume, segmentation, modelId="t2lesion-meshnet11", device="cpu", brainMask=False)
        logic.segment(volume, segmentation, modelId="t2lesion-meshnet11", device="cpu", brainMask=False)
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["User segment", "Lesion"])
        self.delayDisplay("Re-run kept the user's segment")
