"""MRML ↔ core: a volume node's voxels as a :class:`~meshnet_lesion.Volume`, and results written back as nodes.

Everything here runs on the main thread. :func:`writeResult` is all or nothing: a failure leaves
the scene (and a user's segmentation) as it was.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import slicer
import vtk

from meshnet_lesion.errors import InputError, MeshNetLesionError
from meshnet_lesion.volume import Volume

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
SUMMARY_KEYS = ("Model", "LesionVolumeMl", "LesionComponents", "BrainVolumeMl", "Device")


def volumeFromNode(volumeNode, warnings: list[str] | None = None) -> Volume:
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


def writeResult(scene, inputVolumeNode, outputSegmentationNode, result, modelId: str,
                outputProbability: bool):
    """Create or update the segmentation (and probability volume). All or nothing."""
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
        labelmap = _orientedImage(result.labels, inputVolumeNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation_node, ids, None):
            raise MeshNetLesionError("Slicer could not import the lesion label map into the segmentation")
        segment = segmentation.GetSegment(new_segment_id)
        segment.SetName(LESION_SEGMENT_NAME)
        segment.SetColor(*LESION_COLOR)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(segment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
        segment.SetTag(SEGMENT_TAG, modelId)
        if previous:
            index = segmentation.GetSegmentIndex(previous[0])
            for segment_id in previous:
                segmentation.RemoveSegment(segment_id)
            segmentation.SetSegmentIndex(new_segment_id, index)
        if outputProbability:
            _writeProbability(scene, inputVolumeNode, segmentation_node, result.probabilities, created)
        _placeInStudy(scene, inputVolumeNode, [segmentation_node, segmentation_node.GetNodeReference(
            PROBABILITY_REFERENCE) if outputProbability else None])
        for key, value in (("Model", modelId), ("LesionVolumeMl", f"{result.lesion_volume_ml:.3f}"),
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


def _writeProbability(scene, inputVolumeNode, segmentationNode, probability_ijk: np.ndarray, created: list) -> None:
    node = segmentationNode.GetNodeReference(PROBABILITY_REFERENCE)
    if node is None:
        node = scene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode",
            scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} lesion probability"))
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


def _placeInStudy(scene, inputVolumeNode, nodes: list) -> None:
    """Put new nodes beside the input in subject hierarchy (its study, or its parent folder)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
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


def loadTerminology(terminologyLogic) -> str:
    """Load our terminology context (lesion = SNOMED CT Infarct) into Slicer's terminology logic."""
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


def lesionSummary(segmentationNode) -> dict[str, str]:
    """What the last run stored on the segmentation (volume in mL, components, model, device)."""
    if not segmentationNode:
        return {}
    return {k: segmentationNode.GetAttribute(f"MeshNetLesion.{k}") or "" for k in SUMMARY_KEYS}
