"""Tiled inference (a model card's ``"inference": {"tile": N}``) against plain per-tile PyTorch."""
from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from meshnet_lesion import Cancelled, ModelError, Segmenter, build_meshnet, load_volume
from meshnet_lesion.engine import Engine
from meshnet_lesion.registry import Registry
from meshnet_lesion.tiles import run_tiled, tile_starts


def _tiny(seed: int = 4):
    """A MeshNet-3 with He-scaled weights, so that its output depends on the context it sees."""
    torch.manual_seed(seed)
    model = build_meshnet(3)
    with torch.no_grad():
        for block in model.layers:
            block.conv.weight.normal_(0, (2.0 / block.conv.weight[0].numel()) ** 0.5)
    return model.eval()


def _naive(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))[None, None]), 1)[0, 1].numpy()


def test_tiles_overlap_by_half_and_the_last_is_flush_with_the_end():
    assert tile_starts(10, 16) == [0]
    assert tile_starts(40, 16) == [0, 8, 16, 24]
    assert tile_starts(41, 16) == [0, 8, 16, 24, 25]


def test_each_voxel_comes_from_the_tile_where_it_lies_most_centrally():
    model = _tiny()
    x = np.random.default_rng(0).random((30, 26, 22), dtype=np.float32)
    engine = Engine(model.to_loaded(), "cpu", "fp32")
    tiled = run_tiled(engine, x, 16, probability_classes=[1]).probabilities[0]
    whole = engine.run(x, probability_classes=[1]).probabilities[0]
    assert np.abs(tiled - whole).max() > 1e-3            # tiles see less context: not the whole-grid run
    for corner in ([0, 0, 0], [8, 8, 6], [14, 10, 6]):   # a tile's centre voxel is that tile's own answer
        window = tuple(slice(c, c + 16) for c in corner)
        centre = tuple(c + 8 for c in corner)
        assert tiled[centre] == pytest.approx(_naive(model, x[window])[8, 8, 8], abs=1e-4)
    one = run_tiled(engine, x, 32, probability_classes=[1])          # a tile larger than the volume: one run
    np.testing.assert_allclose(one.probabilities[0], whole, atol=1e-6)
    assert np.array_equal(one.labels, engine.run(x).labels)


def test_a_cancelled_tiled_run_stops():
    engine = Engine(_tiny().to_loaded(), "cpu", "fp32")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run_tiled(engine, np.zeros((20, 20, 20), np.float32), 16, cancel=cancel)


def test_a_model_card_asks_for_tiles(tmp_path, monkeypatch):
    """The pipeline runs a model on tiles when its card says so, and refuses a card's tile that is no edge."""
    monkeypatch.setenv("MESHNET_LESION_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    folder.mkdir()
    _tiny().save(folder / "model.safetensors")
    registry = Registry()
    for entry_id, inference in (("whole", {}), ("tiled", {"tile": 24}), ("both", {"tile": 24, "mirror": True}),
                                ("bad", {"tile": 3})):
        registry.import_folder(folder, entry_id, card={"postprocess": {"brain_mask": False}, "inference": inference})
    image = tmp_path / "head.nii.gz"
    head = np.zeros((40, 40, 40), np.float32)
    head[6:34, 6:34, 6:34] = np.random.default_rng(1).random((28, 28, 28), dtype=np.float32) * 100
    nib.save(nib.Nifti1Image(head, np.eye(4)), image)
    volume = load_volume(image)
    results = {entry_id: Segmenter(entry_id, registry=registry, device="cpu", precision="fp32").segment(
        volume, probabilities=True) for entry_id in ("whole", "tiled", "both")}
    assert results["tiled"].probabilities.shape == results["whole"].probabilities.shape
    assert np.abs(results["tiled"].probabilities - results["whole"].probabilities).max() > 0.01
    assert [(r.report()["tile"], r.report()["mirrored"]) for r in results.values()] == [(None, False), (24, False),
                                                                                          (24, True)]
    # the mirrored pass goes through the tiles too: its lesion probability is the larger of both tiled passes
    more = results["both"].probabilities[1] - results["tiled"].probabilities[1]
    assert more.min() >= -1e-6 and more.max() > 0.01
    with pytest.raises(ModelError, match="tile edge"):
        Segmenter("bad", registry=registry, device="cpu")
