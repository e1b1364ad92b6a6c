"""MeshNetLesionLogic on real Slicer core libraries (PyPI slicer-core): MRML in, editable segment out.

The scene is built as trame-slicer's SlicerApp builds it (application logic plus registered
Volumes, Terminologies, Segmentations and SubjectHierarchy logics). Only the Qt GUI is absent.
"""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package")
import vtk  # noqa: E402

from conftest import dice  # noqa: E402
from MeshNetLesionLib import InputError, save_volume  # noqa: E402
from MeshNetLesionLib.logic import (LESION_SEGMENT_NAME, LESION_TERMINOLOGY, SEGMENT_TAG,  # noqa: E402
                                    TERMINOLOGY_CONTEXT, MeshNetLesionLogic)

pytestmark = pytest.mark.slow
FAST = {"brainMask": False, "device": "cpu"}  # the brain-mask path is covered by the core tests


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


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return App(tmp_path_factory.mktemp("terminology-share"))


@pytest.fixture(scope="module")
def logic(app, registry):
    logic = MeshNetLesionLogic(app.scene, registry, app.terminologies)
    assert logic.loadTerminology() == TERMINOLOGY_CONTEXT
    return logic


def _lps_stored(volume):
    """The same image and world grid, stored with i to the left and j to the back (as DICOM)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = np.array(volume.shape)
    to_lps = np.eye(4)
    to_lps[:3, :3] = np.diag([-1.0, -1.0, 1.0])
    to_lps[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
    array = volume.array[::-1, ::-1, :]
    return np.ascontiguousarray(array), volume.affine @ to_lps, flip


def _resampled(volume, spacing, angles, shape):
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    centre = volume.affine @ np.r_[np.array(volume.shape) / 2.0, 1.0]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ (np.array(shape) / 2.0)
    m = np.linalg.inv(volume.affine) @ affine
    data = ndimage.affine_transform(volume.array.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=1)
    return data, affine


def _export(app, segmentation_node, segment_id, reference):
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                reference)
    array = np.array(slicer.util.arrayFromVolume(labelmap)).transpose(2, 1, 0)
    app.scene.RemoveNode(labelmap)
    return array


def _tag(segment, name):
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def _lesion_id(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    found = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
             if segmentation.GetNthSegment(i).GetName() == LESION_SEGMENT_NAME]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def lps_run(app, logic, arc_volume):
    """The ARC scan as an LPS-stored volume node, segmented once (lesion model, no brain mask)."""
    array, affine, _ = _lps_stored(arc_volume)
    node = app.add_volume("M2265 LPS", array, affine)
    seen = []
    before = app.node_ids()
    segmentation = logic.segment(node, progressCallback=lambda f, s: seen.append((f, s)), outputProbability=True,
                                 **FAST)
    return node, segmentation, seen, before


def test_lesion_segment_is_named_coloured_coded_and_editable(app, logic, lps_run):
    node, segmentation_node, _, before = lps_run
    segment = segmentation_node.GetSegmentation().GetSegment(_lesion_id(segmentation_node))
    assert segment.GetName() == "Lesion"
    assert np.allclose(segment.GetColor(), (0.9, 0.1, 0.1))
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert _tag(segment, segment.GetTerminologyEntryTagName()) == LESION_TERMINOLOGY
    assert _tag(segment, SEGMENT_TAG) == "t2lesion-meshnet11"
    assert segmentation_node.GetSegmentation().GetSourceRepresentationName() == "Binary labelmap"
    entry = slicer.vtkSlicerTerminologyEntry()
    assert app.terminologies.DeserializeTerminologyEntry(LESION_TERMINOLOGY, entry)
    assert entry.GetTypeObject().GetCodeValue() == "55641003"
    # reference geometry is the input volume; the node sits in the input's study
    geometry = segmentation_node.GetNodeReferenceID(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert geometry == node.GetID()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study
    assert float(segmentation_node.GetAttribute("MeshNetLesion.LesionVolumeMl")) > 20
    assert segmentation_node.GetAttribute("MeshNetLesion.LesionComponents") == "1"
    new_nodes = app.node_ids() - before
    assert segmentation_node.GetID() in new_nodes


def test_segment_equals_the_command_line_output_voxel_for_voxel(app, lps_run, tmp_path):
    node, segmentation_node, _, _ = lps_run
    exported = _export(app, segmentation_node, _lesion_id(segmentation_node), node)
    array = np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0)
    affine = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node))
    save_volume(tmp_path / "input.nii.gz", array, affine)
    done = subprocess.run([sys.executable, "-m", "MeshNetLesionLib.cli", "segment", tmp_path / "input.nii.gz",
                           "-o", tmp_path / "cli.nii.gz", "--no-brain-mask", "--device", "cpu", "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cli = np.asarray(nib.load(tmp_path / "cli.nii.gz").dataobj)
    assert exported.shape == cli.shape and cli.any()
    assert np.array_equal(exported > 0, cli > 0)


def _ijk_to_ras(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_probability_volume_on_the_input_grid(app, lps_run):
    node, segmentation_node, _, _ = lps_run
    probability = segmentation_node.GetNodeReference("MeshNetLesion.Probability")
    assert probability is not None and probability.IsA("vtkMRMLScalarVolumeNode")
    assert np.allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(probability)),
                       slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)))
    values = slicer.util.arrayFromVolume(probability)
    assert values.shape == slicer.util.arrayFromVolume(node).shape and 0 <= values.min() and values.max() <= 1


def test_progress_is_monotone_and_ends_at_one(lps_run):
    _, _, seen, _ = lps_run
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [s for _, s in seen]
    assert any("conform" in s for s in stages) and any("layer 1 of" in s for s in stages)
    assert "creating segments" in stages and stages[-1] == "done"


def test_terminology_survives_seg_nrrd_and_surface_can_be_made(app, lps_run, tmp_path):
    _, segmentation_node, _, _ = lps_run
    storage = slicer.vtkMRMLSegmentationStorageNode()
    app.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "lesion.seg.nrrd"))
    assert storage.WriteData(segmentation_node)
    reread = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage.ReadData(reread)
    segment = reread.GetSegmentation().GetSegment(_lesion_id(reread))
    assert _tag(segment, segment.GetTerminologyEntryTagName()) == LESION_TERMINOLOGY
    assert segment.GetName() == "Lesion"
    assert reread.CreateClosedSurfaceRepresentation()
    surface = reread.GetClosedSurfaceInternalRepresentation(_lesion_id(reread))
    assert surface is not None and surface.GetNumberOfPoints() > 1000
    app.scene.RemoveNode(reread)
    app.scene.RemoveNode(storage)


@pytest.mark.parametrize("kind, spacing, angles, shape", [
    ("oblique", (1.0, 1.0, 1.0), (15, -10, 12), (200, 220, 200)),
    ("anisotropic", (0.8, 0.8, 3.0), (0, 0, 0), (250, 270, 70)),
])
def test_oblique_and_anisotropic_nodes(kind, spacing, angles, shape, app, logic, arc_volume, lps_run):
    array, affine = _resampled(arc_volume, spacing, angles, shape)
    node = app.add_volume(kind, array, affine)
    segmentation_node = logic.segment(node, **FAST)
    exported = _export(app, segmentation_node, _lesion_id(segmentation_node), node)
    result = logic.job.result
    assert exported.shape == tuple(shape) and np.array_equal(exported > 0, result.labels > 0)
    # and the lesion is where the native-grid run found it
    native_node, native_segmentation, _, _ = lps_run
    native = _export(app, native_segmentation, _lesion_id(native_segmentation), native_node)
    m = np.linalg.inv(affine) @ slicer.util.arrayFromVTKMatrix(_ijk_to_ras(native_node))
    on_native = ndimage.affine_transform(exported, m[:3, :3], m[:3, 3], output_shape=native.shape, order=0)
    assert dice(on_native, native) > 0.85


def test_rerun_replaces_only_the_lesion_segment(app, logic, lps_run):
    node, _, _, _ = lps_run
    output = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    output.CreateDefaultDisplayNodes()
    output.SetReferenceImageGeometryParameterFromVolumeNode(node)
    user_id = output.GetSegmentation().AddEmptySegment("ventricles", "Ventricles", [0.2, 0.4, 1.0])
    logic.segment(node, output, **FAST)
    logic.segment(node, output, **FAST)
    segmentation = output.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Ventricles", "Lesion"]
    assert segmentation.GetSegment(user_id) is not None


def test_cancel_leaves_the_scene_as_it_was(app, logic, lps_run):
    node, _, _, _ = lps_run
    before = app.node_ids()
    job = logic.segmentAsync(node, **FAST)
    job.addProgressCallback(lambda fraction, stage: job.cancel() if fraction > 0.05 else None)
    job.wait(timeout=120)
    assert job.state == "cancelled" and job.segmentationNode is None
    assert job.progress < 0.5  # stopped at the next slab, not at the end
    assert app.node_ids() == before


def test_removing_the_input_cancels_the_run(app, logic, arc_volume):
    node = app.add_volume("to be removed", arc_volume.array, arc_volume.affine)
    job = logic.segmentAsync(node, **FAST)
    before = app.node_ids() - {node.GetID()}
    app.scene.RemoveNode(node)
    job.wait(timeout=120)
    assert job.state == "cancelled"
    assert app.node_ids() == before


def test_closing_the_scene_cancels_the_run(tmp_path_factory, registry, arc_volume):
    local = App(tmp_path_factory.mktemp("share"))
    logic = MeshNetLesionLogic(local.scene, registry)
    node = local.add_volume("scan", arc_volume.array, arc_volume.affine)
    job = logic.segmentAsync(node, **FAST)
    local.scene.Clear(0)
    job.wait(timeout=120)
    assert job.state == "cancelled"
    assert local.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


@pytest.mark.parametrize("make, message", [
    (lambda app: app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels"), "label map"),
    (lambda app: app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), "no voxels"),
])
def test_unusable_nodes_are_refused_before_anything_runs(make, message, app, logic):
    node = make(app)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        slicer.util.updateVolumeFromArray(node, np.ones((4, 4, 4), np.uint8))
    before = app.node_ids()
    with pytest.raises(InputError, match=message):
        logic.segment(node, **FAST)
    assert app.node_ids() == before


def test_constant_volume_fails_cleanly(app, logic):
    node = app.add_volume("zeros", np.zeros((40, 40, 40), np.float32), np.eye(4))
    before = app.node_ids()
    with pytest.raises(InputError, match="constant"):
        logic.segment(node, **FAST)
    assert app.node_ids() == before


def test_failed_import_rolls_back(app, logic, lps_run, monkeypatch):
    node, _, _, _ = lps_run
    output = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    output.GetSegmentation().AddEmptySegment("mine", "Mine", [0, 1, 0])
    before = app.node_ids()

    class Failing:
        @staticmethod
        def ImportLabelmapToSegmentationNode(*args):
            return False

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Failing)
    with pytest.raises(Exception, match="could not import"):
        logic.segment(node, output, **FAST)
    monkeypatch.undo()
    assert app.node_ids() == before
    assert output.GetSegmentation().GetNumberOfSegments() == 1
    assert not output.GetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    with pytest.raises(Exception, match="could not import"):
        monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Failing)
        logic.segment(node, None, **FAST)
    monkeypatch.undo()
    assert app.node_ids() == before


def test_parameter_node_is_a_singleton(app, logic):
    first = logic.getParameterNode()
    assert logic.getParameterNode() is first
    assert first.GetAttribute("ModuleName") == "MeshNetLesion"


def test_volume_under_a_linear_transform_is_segmented_in_world_space(app, logic, lps_run):
    """Local IJK-to-RAS R⁻¹·A under a transform R has the world geometry A: the same lesion must come out."""
    node, native_segmentation, _, _ = lps_run
    world = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node))
    rotation = np.eye(4)
    rotation[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(rotation))
    moved = app.add_volume("under transform", np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0),
                           np.linalg.inv(rotation) @ world)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    segmentation_node = logic.segment(moved, **FAST)
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    exported = _export(app, segmentation_node, _lesion_id(segmentation_node), moved)
    native = _export(app, native_segmentation, _lesion_id(native_segmentation), node)
    assert np.array_equal(exported > 0, native > 0)
