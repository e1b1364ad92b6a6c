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
