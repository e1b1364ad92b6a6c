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
OUTPUT_ATTRIBUTE = "MeshNetLesion.Output"       # on volumes this module wrote ("probability"): never an input
OUTPUT_CLASS_ATTRIBUTE = "MeshNetLesion.Class"  # the segment a probability volume belongs to
TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "MeshNetLesion.term.json"
TERMINOLOGY_CONTEXT = "Segmentation category and type - MeshNetLesion"
# SNOMED CT: category 49755003 "Morphologically altered structure", type 55641003 "Infarct",
# region 12738006 "Brain". Slicer's default lists have no infarct type, hence our own context.
LESION_TERMINOLOGY = (f"{TERMINOLOGY_CONTEXT}~SCT^49755003^Morphologically Altered Structure"
                      "~SCT^55641003^Infarct~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
SUMMARY_KEYS = ("Model", "LesionVolumeMl", "LesionComponents", "LargestLesionMl", "LargestLesionHemisphere",
                "Classes", "BrainVolumeMl", "Device")


def volumeFromNode(volumeNode, warnings: list[str] | None = None) -> Volume:
    """A copy of the node's voxels and its IJK-to-world matrix (call on the main thread)."""
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume as input")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{volumeNode.GetName()}' is a label map, not an MRI scan")
    if volumeNode.GetAttribute(OUTPUT_ATTRIBUTE):
        raise InputError(f"'{volumeNode.GetName()}' is a {volumeNode.GetAttribute(OUTPUT_ATTRIBUTE)} map "
                         "written by MeshNet Lesion, not an MRI scan")
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


def segmentNames(result) -> list[str]:
    """The segments a result becomes, for label values 1..N: "Lesion", or one per class of other models."""
    if result.is_lesion_model:
        return [LESION_SEGMENT_NAME]
    return [c.name[:1].upper() + c.name[1:] for c in result.classes[1:]]


def writeResult(scene, inputVolumeNode, outputSegmentationNode, result, modelId: str,
                outputProbability: bool):
    """Create or update the segmentation (and probability volumes). All or nothing.

    A lesion model gives one "Lesion" segment (SNOMED CT Infarct); other models one segment per
    class, named and coloured from the model's classes. Segments from an earlier run of this module
    are updated in place and keep their IDs (a Segment Statistics table or a script that names them
    stays valid); the user's own segments stay. The label map is imported through the transform
    between the input and the segmentation when they sit under different transforms."""
    created: list = []
    new_ids: list[str] = []
    previous: list[str] = []
    backups: dict[str, tuple[int, object]] = {}   # segments of the earlier run, as they were
    segmentation_node = outputSegmentationNode
    geometry_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry_role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    saved_geometry = None
    if segmentation_node is not None:
        saved_geometry = (segmentation_node.GetSegmentation().GetConversionParameter(geometry_name),
                          segmentation_node.GetNodeReferenceID(geometry_role))
    try:
        if segmentation_node is None:
            suffix = "lesion" if result.is_lesion_model else modelId
            segmentation_node = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} {suffix}"))
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
        previous_by_name = {segmentation.GetSegment(segment_id).GetName(): segment_id for segment_id in previous}
        names = segmentNames(result)
        ids = vtk.vtkStringArray()   # label value n + 1 goes to ids[n]
        for name in names:
            segment_id = previous_by_name.get(name)
            if segment_id is None or segment_id in new_ids:
                segment_id = name if segmentation.GetSegment(name) is None and name not in new_ids \
                    else segmentation.GenerateUniqueSegmentID(name)
            else:
                backup = slicer.vtkSegment()
                backup.DeepCopy(segmentation.GetSegment(segment_id))
                backups[segment_id] = (segmentation.GetSegmentIndex(segment_id), backup)
            new_ids.append(segment_id)
            ids.InsertNextValue(segment_id)
        labelmap = _orientedImage(result.labels, inputVolumeNode, result.summarize()["label_box"])
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation_node, ids, _transformBetween(inputVolumeNode, segmentation_node)):
            raise MeshNetLesionError("Slicer could not import the label map into the segmentation")
        colors = [LESION_COLOR] if result.is_lesion_model else [
            tuple(channel / 255 for channel in c.color) for c in result.classes[1:]]
        for segment_id, name, color in zip(new_ids, names, colors):
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(name)
            segment.SetColor(*color)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            if result.is_lesion_model:
                segment.SetTag(segment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
            segment.SetTag(SEGMENT_TAG, modelId)
        if previous:
            index = segmentation.GetSegmentIndex(previous[0])
            for segment_id in previous:
                if segment_id not in new_ids:
                    segmentation.RemoveSegment(segment_id)
            for offset, segment_id in enumerate(new_ids):
                segmentation.SetSegmentIndex(segment_id, index + offset)
        probability_nodes = []
        if outputProbability:
            probability_nodes = _writeProbabilities(scene, inputVolumeNode, segmentation_node, result, names, created)
        _placeInStudy(scene, inputVolumeNode, [segmentation_node, *probability_nodes])
        for key, value in summaryAttributes(result, modelId).items():
            segmentation_node.SetAttribute(f"MeshNetLesion.{key}", value)
        return segmentation_node
    except BaseException:
        if saved_geometry is not None:  # the user's segmentation goes back to how it was
            segmentation = segmentation_node.GetSegmentation()
            for segment_id in new_ids:
                if segmentation.GetSegment(segment_id) is not None and segment_id not in previous:
                    segmentation.RemoveSegment(segment_id)
            for segment_id, (index, backup) in backups.items():
                segmentation.RemoveSegment(segment_id)
                segmentation.AddSegment(backup, segment_id)
                segmentation.SetSegmentIndex(segment_id, index)
            segmentation.SetConversionParameter(geometry_name, saved_geometry[0])
            segmentation_node.SetNodeReferenceID(geometry_role, saved_geometry[1])
        for node in reversed(created):
            for index in range(node.GetNumberOfDisplayNodes() - 1, -1, -1):
                scene.RemoveNode(node.GetNthDisplayNode(index))
            scene.RemoveNode(node)
        raise


def _transformBetween(volumeNode, segmentationNode):
    """The transform from the volume's frame to the segmentation's, None when both sit under the same one."""
    if volumeNode.GetParentTransformNode() is segmentationNode.GetParentTransformNode():
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeNode.GetParentTransformNode(),
                                                        segmentationNode.GetParentTransformNode(), transform)
    return transform


def showInSliceViews(scene, volumeNode, probabilityNode=None, opacity: float = 0.4) -> None:
    """The input as every slice view's background and the probability map, when there is one, as its
    foreground (as ``slicer.util.setSliceViewerLayers`` does, on this scene); the segmentation shows itself."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(volumeNode.GetID())
        if probabilityNode is not None:
            composite.SetForegroundVolumeID(probabilityNode.GetID())
            composite.SetForegroundOpacity(opacity)


def summaryAttributes(result, modelId: str) -> dict[str, str]:
    """What the panel shows after a run, stored on the segmentation node (see :data:`SUMMARY_KEYS`)."""
    summary = result.summarize()
    largest = summary["largest_lesion"]
    classes = "" if result.is_lesion_model else "; ".join(
        f"{name} {volume:.1f} mL" for name, volume in zip(segmentNames(result), summary["class_volumes_ml"].values()))
    return {"Model": modelId,
            "LesionVolumeMl": "" if summary["lesion_volume_ml"] is None else f"{summary['lesion_volume_ml']:.3f}",
            "LesionComponents": "" if summary["lesion_components"] is None else str(summary["lesion_components"]),
            "LargestLesionMl": "" if largest is None else f"{largest['volume_ml']:.3f}",
            "LargestLesionHemisphere": "" if largest is None else largest["hemisphere"],
            "Classes": classes,
            "BrainVolumeMl": "" if summary["brain_volume_ml"] is None else f"{summary['brain_volume_ml']:.1f}",
            "Device": result.device}


def _orientedImage(labels_ijk: np.ndarray, volumeNode, box: list[list[int]] | None):
    """The labels inside ``box`` (start, stop per axis) as an image on the volume's grid: only the labels'
    bounding box is copied and imported, which keeps Slicer's main thread free (a lesion is small)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    box = box or [[0, 1]] * 3    # no labels: one background voxel
    image = slicer.vtkOrientedImageData()
    image.SetExtent(box[0][0], box[0][1] - 1, box[1][0], box[1][1] - 1, box[2][0], box[2][1] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    inside = labels_ijk[tuple(slice(start, stop) for start, stop in box)]
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(inside, np.uint8).ravel(order="F")
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _writeProbabilities(scene, inputVolumeNode, segmentationNode, result, names: list[str], created: list) -> list:
    """One probability volume per segment (the lesion's, or each class's), reused by a re-run."""
    maps = [result.probabilities] if result.is_lesion_model else list(result.probabilities[1:])
    existing = {}
    for index in range(segmentationNode.GetNumberOfNodeReferences(PROBABILITY_REFERENCE)):
        node = segmentationNode.GetNthNodeReference(PROBABILITY_REFERENCE, index)
        if node is not None:
            existing[node.GetAttribute(OUTPUT_CLASS_ATTRIBUTE)] = node
    nodes = []
    matrix = vtk.vtkMatrix4x4()
    inputVolumeNode.GetIJKToRASMatrix(matrix)
    for name, probability_ijk in zip(names, maps):
        node = existing.get(name)
        if node is None:
            node = scene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode",
                scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} {name.lower()} probability"))
            created.append(node)
            node.CreateDefaultDisplayNodes()
            node.SetAttribute(OUTPUT_ATTRIBUTE, "probability")
            node.SetAttribute(OUTPUT_CLASS_ATTRIBUTE, name)
            segmentationNode.AddNodeReferenceID(PROBABILITY_REFERENCE, node.GetID())
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(probability_ijk.transpose(2, 1, 0), np.float32))
        display = node.GetDisplayNode()
        if display is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
        nodes.append(node)
    return nodes


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


def isInputCandidate(node) -> bool:
    """A scalar volume a user may segment: not a label map, not one of this module's outputs."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            and not node.GetAttribute(OUTPUT_ATTRIBUTE))


def lesionSummary(segmentationNode) -> dict[str, str]:
    """What the last run stored on the segmentation (volume in mL, components, model, device)."""
    if not segmentationNode:
        return {}
    return {k: segmentationNode.GetAttribute(f"MeshNetLesion.{k}") or "" for k in SUMMARY_KEYS}
