"""A headless Slicer scene from the PyPI ``slicer-core`` package (used by the tests and the benchmarks).

Built as trame-slicer's SlicerApp builds it: application logic plus the registered Volumes,
Terminologies, Segmentations and SubjectHierarchy logics. Only the Qt GUI is absent.
"""
from __future__ import annotations

import numpy as np
import slicer


class App:
    """A headless Slicer: scene, application logic and the module logics MeshNetLesion relies on."""

    def __init__(self, share_dir):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.volumes = self._register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        self.terminologies = self._register(slicer.vtkSlicerTerminologiesModuleLogic(), "Terminologies", share_dir)
        self.segmentations = self._register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        self.hierarchy_logic = self._register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")

    def _register(self, logic, name, share_dir=None):
        if share_dir is not None:
            logic.SetModuleShareDirectory(str(share_dir))
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def add_volume(self, name, array_ijk, affine, study="Study 1"):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
        node.CreateDefaultDisplayNodes()
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
        study_item = hierarchy.CreateStudyItem(patient, study)
        hierarchy.CreateItem(study_item, node)
        return node

    def node_ids(self):
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}


class QtMainThread:
    """Slicer's main thread as far as the GIL goes, to drive a job the way the panel's timer does.

    PythonQt's thread support is off in Slicer, so the main thread keeps the GIL while Qt's event
    loop idles; other Python threads run only while Python code called from the loop releases it
    (``time.sleep``, blocking I/O). Idling is reproduced by a C call made through ``ctypes.PyDLL``,
    which, unlike ``ctypes.CDLL``, does not release the GIL: ``usleep`` with the GIL held.
    """

    def __init__(self, interval_ms: int) -> None:
        import ctypes

        self.interval_s = interval_ms / 1000
        self._usleep = ctypes.PyDLL(None).usleep    # GIL held for the whole call
        self.stalls_s: list[float] = []             # how long each timer callback kept the loop busy

    def idle(self, seconds: float) -> None:
        if seconds > 0:
            self._usleep(int(seconds * 1e6))

    def run_timer(self, callback, until, timeout_s: float = 3600.0) -> float:
        """Call ``callback`` every interval (idling with the GIL in between) until ``until()``; returns seconds."""
        import time

        started = time.perf_counter()
        while not until():
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError("the timer loop did not finish in time")
            tick = time.perf_counter()
            callback()
            spent = time.perf_counter() - tick
            self.stalls_s.append(spent)
            self.idle(self.interval_s - spent)
        return time.perf_counter() - started
