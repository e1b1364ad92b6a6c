"""The ARC-trained models: the replication's checkpoints, its input recipe, ensembles and standardisation."""
from __future__ import annotations

import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from meshnet_lesion import ModelError, Registry, Segmenter, Volume, load_model_files, load_volume, save_volume
from meshnet_lesion.conform import reorient, to_source, zoom_to_grid
from meshnet_lesion.engine import Engine
from meshnet_lesion.preprocess import brain_percentiles, normalize, standardize
from meshnet_lesion.spec import InputSpec, ModelSpec, Normalization, Standardization, paper_spec
from meshnet_lesion.train.metrics import dice
from meshnet_lesion.train.model import build_meshnet
from meshnet_lesion.volume import left_right_axis


# ------------------------------------------------------------------ the replication's own code, re-typed
class _TheirBlock(nn.Module):
    """arc-meshchop's ConvBNReLU (models/meshnet.py): Conv3d(padding=dilation) → BatchNorm3d → ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.bn = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _TheirMeshNet(nn.Module):
    """arc-meshchop's MeshNet: dilations 1,2,4,8,16,16,8,4,2 then a 1×1×1 conv, as ``network.{i}``."""

    def __init__(self, channels: int = 26) -> None:
        super().__init__()
        dilations = [1, 2, 4, 8, 16, 16, 8, 4, 2]
        blocks = [_TheirBlock(1 if i == 0 else channels, channels, d) for i, d in enumerate(dilations)]
        self.network = nn.Sequential(*blocks, nn.Conv3d(channels, 2, 1))

    def forward(self, x):
        return self.network(x)


def _their_preprocessing(path) -> np.ndarray:
    """arc-meshchop ``preprocess_volume`` (resample_method 'scipy_zoom') step for step: canonical RAS+,
    get_fdata as float32, zoom by the column norms of the affine, centred crop then pad, min-max."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    spacing = np.sqrt(np.sum(image.affine[:3, :3] ** 2, axis=0))
    zoomed = ndimage.zoom(data, [c / 1.0 for c in spacing], order=1)
    current = zoomed.copy()
    for dim in range(3):
        if current.shape[dim] > 256:
            start = (current.shape[dim] - 256) // 2
            index = [slice(None)] * 3
            index[dim] = slice(start, start + 256)
            current = current[tuple(index)]
    result = np.zeros((256, 256, 256), dtype=np.float32)
    d, h, w = current.shape
    starts = [max(0, (256 - n) // 2) for n in (d, h, w)]
    result[starts[0]:starts[0] + d, starts[1]:starts[1] + h, starts[2]:starts[2] + w] = current
    lo, hi = result.min(), result.max()
    return ((result - lo) / (hi - lo)).astype(np.float32)


def _anisotropic_lps(volume: Volume) -> Volume:
    """M2265 on a 0.9×0.9×3 mm grid stored with i to the left and j to the back (DICOM-like), not 256³."""
    shape = (200, 230, 60)
    affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    centre = volume.affine @ np.r_[np.array(volume.shape) / 2.0, 1.0]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ (np.array(shape) / 2.0)
    matrix = np.linalg.inv(volume.affine) @ affine
    data = ndimage.affine_transform(np.asarray(volume.array, np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=shape, order=1)
    return Volume((data * 11.0).astype(np.int16), affine)


# ------------------------------------------------------------------ the checkpoint format
def test_checkpoint_reader_builds_the_papers_meshnet26_and_runs_it_as_their_code_does(registry):
    path = registry.fetch("arc-meshnet26-r0")["final.pt"]
    loaded = load_model_files({"final.pt": path})
    spec = loaded.spec
    assert loaded.num_parameters == 147_474
    assert [layer.dilation for layer in spec.layers] == [1, 2, 4, 8, 16, 16, 8, 4, 2, 1]
    assert all(layer.norm == "batch" and layer.activation == "relu" for layer in spec.layers[:-1])
    assert spec.input == InputSpec("zoom", "RAS") and spec.normalization.method == "minmax"
    theirs = _TheirMeshNet()
    theirs.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"])
    theirs.eval()
    x = np.random.default_rng(0).random((40, 36, 44), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(theirs(torch.from_numpy(x)[None, None]), dim=1)[0, 1].numpy()
    ours = Engine(loaded, "cpu").run(x, probability_classes=[1]).probabilities[0]
    assert np.abs(ours - expected).max() < 1e-4


class _Payload:
    """Unpickling this runs code: it would create the file named in ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    state = build_meshnet(5).state_dict()
    torch.save({"model_state_dict": {f"network.{k}": v for k, v in state.items()}, "extra": _Payload(str(marker))},
               tmp_path / "final.pt")
    assert zipfile.is_zipfile(tmp_path / "final.pt")
    with pytest.raises(ModelError, match="only plain tensors"):
        load_model_files({"final.pt": tmp_path / "final.pt"})
    assert not marker.exists()


def test_checkpoint_of_another_network_is_refused(tmp_path):
    torch.save({"model_state_dict": {"network.0.conv.weight": torch.zeros(5, 1, 3, 3, 3)}}, tmp_path / "final.pt")
    with pytest.raises(ModelError, match="paper's MeshNet"):
        load_model_files({"final.pt": tmp_path / "final.pt"})


# ------------------------------------------------------------------ the replication's input recipe
def test_zoom_grid_is_the_replications_recipe_bit_for_bit(sample_paths, arc_volume, tmp_path):
    oblique = _anisotropic_lps(arc_volume)
    paths = [sample_paths["sample-arc-m2265-t2w"], save_volume(tmp_path / "lps.nii.gz", oblique.array, oblique.affine)]
    for path in paths:
        grid = reorient(zoom_to_grid(load_volume(path)), "RAS")
        assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")
        assert np.array_equal(normalize(grid.array, Normalization("minmax")), _their_preprocessing(path))


def test_zoom_grid_maps_back_onto_the_source_exactly(arc_volume):
    """Trilinear interpolation reproduces a linear function, so any error would be the geometry's."""
    volume = _anisotropic_lps(arc_volume)
    grid = zoom_to_grid(volume)
    ijk = np.indices((256, 256, 256), dtype=np.float64).reshape(3, -1)
    world = (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:]).reshape(3, 256, 256, 256)
    weights = np.array([0.3, -0.2, 0.5])
    field = np.tensordot(weights, world, axes=1).astype(np.float32) + 200.0
    back = to_source(field, grid, order=1)
    source = np.indices(volume.shape, dtype=np.float64).reshape(3, -1)
    expected = (np.tensordot(weights, volume.affine[:3, :3] @ source + volume.affine[:3, 3:], axes=1)
                .reshape(volume.shape) + 200.0)
    inner = tuple(slice(2, n - 2) for n in volume.shape)           # all inside the zoomed box
    assert np.abs(back[inner] - expected[inner]).max() < 2e-3


def _their_labels_on(volume: Volume, theirs_ras: np.ndarray) -> np.ndarray:
    """Their output is on the canonical RAS+ grid; M2265 is stored LIA 256³, so it maps back by axis flips."""
    ornt = nib.orientations.io_orientation(volume.affine)
    return nib.orientations.apply_orientation(theirs_ras, nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), ornt))


@pytest.fixture(scope="module")
def their_probability(registry, sample_paths):
    """A restart's lesion probability by the replication's own recipe on M2265 (fp32, the whole grid), computed
    once per restart."""
    their_input = _their_preprocessing(sample_paths["sample-arc-m2265-t2w"])
    known: dict[int, np.ndarray] = {}

    def of(restart: int) -> np.ndarray:
        if restart not in known:
            known[restart] = Engine(registry.load(f"arc-meshnet26-r{restart}"), "cpu").run(
                their_input, probability_classes=[1]).probabilities[0]
        return known[restart]
    return of


@pytest.mark.slow
def test_arc_meshnet26_through_our_pipeline_is_the_replications_own_result_on_m2265(registry, arc_volume,
                                                                                    their_probability):
    """One restart, as the replication ran it: their recipe, no brain mask, no standardisation."""
    theirs = _their_labels_on(arc_volume, their_probability(2) > 0.5)
    plain = Segmenter("arc-meshnet26-r2", registry=registry, device="cpu", precision="fp32", brain_mask=False,
                      standardize=False, mirror=False)
    ours = plain.segment(arc_volume).labels
    assert dice(ours, theirs) >= 0.999
    assert 75 < ours.sum() / 1000 < 83                                    # 79 mL by the replication's recipe


@pytest.mark.quality
def test_the_default_is_the_replications_ensemble_on_m2265(arc_volume, arc_result, their_probability):
    """The default (the three restarts' mean, standardised to M2265's own landmarks, on the brain's box + 24
    with the rest of the grid as background, inside the brain, also on the mirrored scan; in ``auto``
    precision, bf16 where this CPU runs it faster) against the three by their recipe in fp32 on the whole
    grid, one pass."""
    ensemble = _their_labels_on(arc_volume, np.mean([their_probability(r) for r in range(3)], axis=0) > 0.5)
    assert arc_result.model_id == "arc-meshnet26"
    assert dice(arc_result.labels, ensemble & arc_result.brain) >= 0.99


# ------------------------------------------------------------------ ensembles
@pytest.fixture()
def ensemble_registry(tmp_path, shared):
    """The two 11-channel ARC models (the same input convention) and an ensemble of them."""
    from meshnet_lesion.registry import BUILTIN_REGISTRY

    builtin = json.loads(BUILTIN_REGISTRY.read_text(encoding="utf-8"))
    members = [m for m in builtin["models"] if m["id"] in ("t2lesion-meshnet11", "brainchop-arc-meshnet11")]
    pair = {"id": "pair", "task": "lesion", "members": [m["id"] for m in members], "files": [], "default": True,
            "postprocess": {"brain_mask": False}}
    for member in members:
        member.pop("default", None)
    (tmp_path / "models.json").write_text(json.dumps({"schema_version": 1, "models": [*members, pair],
                                                      "samples": []}))
    return Registry(tmp_path / "models.json", cache_dir=tmp_path / "cache", mirror=shared)


@pytest.mark.slow
def test_an_ensemble_averages_its_members_probabilities(ensemble_registry, arc_part):
    runs = {name: Segmenter(name, registry=ensemble_registry, device="cpu", brain_mask=False, standardize=False,
                            mirror=False).segment(arc_part, probabilities=True)
            for name in ("t2lesion-meshnet11", "brainchop-arc-meshnet11", "pair")}
    first, second = runs["t2lesion-meshnet11"], runs["brainchop-arc-meshnet11"]
    mean = (first.probabilities + second.probabilities) / 2
    assert np.abs(runs["pair"].probabilities - mean).max() < 1e-5
    assert np.array_equal(runs["pair"].labels, (mean > 0.5).astype(np.uint8))
    assert abs(first.lesion_volume_ml - second.lesion_volume_ml) > 5      # the members really differ
    assert ensemble_registry.is_available("pair") and len(ensemble_registry.fetch_all("pair")) == 4
    assert ensemble_registry.download_size("pair") == sum(
        f.size for m in ensemble_registry.members("pair") for f in m.files)
    with pytest.raises(ModelError, match="ensemble"):
        ensemble_registry.load("pair")


def test_an_ensemble_of_different_input_conventions_is_refused(ensemble_registry, tmp_path):
    data = json.loads((tmp_path / "models.json").read_text())
    data["models"][1]["spec"]["input"] = {"grid": "zoom", "orientation": "RAS"}
    (tmp_path / "models.json").write_text(json.dumps(data))
    local = Registry(tmp_path / "models.json", cache_dir=tmp_path / "cache", mirror=ensemble_registry.mirror)
    with pytest.raises(ModelError, match="differ in input convention"):
        Segmenter("pair", registry=local, device="cpu", brain_mask=False, standardize=False)


def test_only_a_lesion_models_pass_is_mirrored_along_the_grids_left_right_axis(registry):
    with pytest.raises(ModelError, match="not a lesion model"):
        Segmenter("brainchop-mindgrab", registry=registry, device="cpu", mirror=True)
    for codes, axis in (("LIA", 0), ("RAS", 0), ("SRA", 1), ("ASL", 2)):
        affine = np.eye(4)                                   # column i: the RAS direction of voxel axis i
        for column, code in enumerate(codes):
            row = "RAS".find(code) if code in "RAS" else "LPI".find(code)
            affine[:3, column] = 0
            affine[row, column] = 1 if code in "RAS" else -1
        assert left_right_axis(affine) == axis, codes


# ------------------------------------------------------------------ the model description
def test_input_conventions_and_landmarks_round_trip_and_bad_ones_are_refused():
    spec = paper_spec(5, input=InputSpec("zoom", "ras"))
    spec = ModelSpec(spec.layers, spec.normalization, spec.classes, input=spec.input,
                     standardization=Standardization((5, 50, 95), (0.1, 0.3, 0.8)))
    again = ModelSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec and again.input.orientation == "RAS"
    for bad in ({"grid": "mri_convert"}, {"orientation": "LLA"}, {"orientation": "RA"}):
        with pytest.raises(ModelError):
            spec.with_overrides({"input": bad})
    with pytest.raises(ModelError):
        Standardization((50, 5), (0.1, 0.2))
    with pytest.raises(ModelError):
        spec.with_overrides({"standardization": {"percentiles": [5, 50]}})


def test_standardisation_undoes_a_monotone_intensity_change_at_the_landmarks():
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0.35, 0.12, (60, 60, 60)), 0, 1).astype(np.float32)
    brain = np.zeros(x.shape, bool)
    brain[10:50, 10:50, 10:50] = True
    percentiles = (5.0, 25.0, 50.0, 75.0, 95.0)
    standard = Standardization(percentiles, tuple(brain_percentiles(x, brain, percentiles)))
    same = standardize(x, brain, standard)
    assert np.abs(same - x).max() < 1e-5                                  # a scan like the reference stays
    bent = x ** 0.7
    restored = standardize(bent, brain, standard)
    assert np.allclose(brain_percentiles(restored, brain, percentiles), standard.landmarks, atol=1e-4)
    assert np.abs(restored - x)[brain].mean() < 0.01 < np.abs(bent - x)[brain].mean()
    assert standardize(x, np.zeros_like(brain), standard) is None         # no brain, no percentiles
    assert standardize(np.zeros_like(x), brain, standard) is None         # no contrast, no percentiles


@pytest.mark.slow
def test_stored_landmarks_are_those_of_the_reference_scan(registry, arc_volume, arc_result):
    """The registry's landmarks are M2265's brain percentiles through each model's own input convention.

    M2265 is conformed already, so every grid here is its own voxel lattice and the default run's
    MindGrab brain mask applies as it is (lab/training/reference_landmarks.py computes the same).
    """
    from meshnet_lesion.pipeline import model_grid

    for model_id in ("t2lesion-meshnet11", "brainchop-arc-meshnet11", "arc-meshnet26-r0", "arc-meshnet26-r2"):
        spec = registry.load(model_id).spec
        grid = model_grid(arc_volume, spec.input, {})
        brain = perturb_onto_grid(arc_result.brain, arc_volume, grid)
        found = brain_percentiles(normalize(grid.array, spec.normalization), brain, spec.standardization.percentiles)
        assert np.abs(found - np.asarray(spec.standardization.landmarks)).max() < 1e-3, model_id


def perturb_onto_grid(mask: np.ndarray, volume: Volume, grid) -> np.ndarray:
    """A source-grid mask on a model grid that is the same lattice (axis flips and swaps only)."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(volume.affine),
                                                nib.orientations.io_orientation(grid.affine))
    moved = nib.orientations.apply_orientation(mask, transform)
    assert np.allclose(volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape), grid.affine)
    return moved


def test_importing_a_checkpoint_keeps_its_input_convention(registry, tmp_path):
    folder = tmp_path / "replication"
    folder.mkdir()
    shutil.copy(registry.fetch("arc-meshnet26-r1")["final.pt"], folder / "final.pt")
    local = Registry(cache_dir=tmp_path / "cache")
    entry = local.import_folder(folder, "my-meshnet26")
    assert local.load(entry).spec.input == InputSpec("zoom", "RAS")
