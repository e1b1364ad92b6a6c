"""Tiled inference (a model card's ``"inference": {"tile": N}``) against plain per-tile PyTorch."""
from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from meshnet_lesion import Cancelled, ModelError, Segmenter, load_volume
from meshnet_lesion.engine import Engine
from meshnet_lesion.registry import Registry
from meshnet_lesion.tiles import axis_tiles, run_tiled
from meshnet_lesion.train.model import build_meshnet


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


def _spans(tiles):
    return [(w.start, w.stop, o.start, o.stop) for w, o in tiles]


def test_tiles_lie_on_the_grid_and_each_voxel_comes_from_the_nearest_centre():
    # 16-voxel tiles at multiples of 8 of the grid; each owns the 8 voxels about its centre
    assert _spans(axis_tiles(40, 16)) == [(0, 16, 0, 12), (8, 24, 12, 20), (16, 32, 20, 28), (24, 40, 28, 40)]
    # the same axis one voxel further into the grid: the tiles stay where they were on the grid, cut to the array
    assert _spans(axis_tiles(39, 16, origin=1)) == [(0, 15, 0, 11), (7, 23, 11, 19), (15, 31, 19, 27),
                                                   (23, 39, 27, 39)]
    assert _spans(axis_tiles(10, 16)) == [(0, 10, 0, 10)]          # shorter than a tile: one, cut
    assert _spans(axis_tiles(10, 16, origin=7)) == [(0, 9, 0, 5), (1, 10, 5, 10)]
    for length, tile, origin in ((172, 96, 39), (207, 96, 3), (41, 16, 5), (30, 17, 2)):
        tiles = axis_tiles(length, tile, origin)
        owned = np.concatenate([np.arange(length)[o] for _, o in tiles])
        assert np.array_equal(owned, np.arange(length))              # every voxel once, in order
        for window, own in tiles:                                    # a quarter tile of context, but at the ends
            assert own.start - window.start >= tile // 4 or window.start == 0
            assert window.stop - own.stop >= tile // 4 or window.stop == length
            assert (window.start + origin) % (tile // 2) == 0 or window.start == 0


def test_each_voxel_comes_from_the_tile_where_it_lies_most_centrally():
    model = _tiny()
    x = np.random.default_rng(0).random((30, 26, 22), dtype=np.float32)
    engine = Engine(model.to_loaded(), "cpu", "fp32")
    tiled = run_tiled(engine, x, 16, probability_classes=[1]).probabilities[0]
    whole = engine.run(x, probability_classes=[1]).probabilities[0]
    assert np.abs(tiled - whole).max() > 1e-3            # tiles see less context: not the whole-grid run
    for corner in ([0, 0, 0], [8, 8, 0], [16, 8, 8]):    # a tile's centre voxel is that tile's own answer
        window = tuple(slice(c, c + 16) for c in corner)
        centre = tuple(c + 8 for c in corner)
        assert tiled[centre] == pytest.approx(_naive(model, x[window])[8, 8, 8], abs=1e-4)
    one = run_tiled(engine, x, 32, probability_classes=[1])          # a tile larger than the volume: one run
    np.testing.assert_allclose(one.probabilities[0], whole, atol=1e-6)
    assert np.array_equal(one.labels, engine.run(x).labels)


def test_a_box_moved_by_a_voxel_leaves_the_tiles_where_they_were():
    """A brain mask one voxel larger (a gamma-shifted scan's) moves the box the network runs on, not its tiles."""
    engine = Engine(_tiny().to_loaded(), "cpu", "fp32")
    grid = np.random.default_rng(2).random((48, 40, 40), dtype=np.float32)
    box = (slice(5, 45), slice(3, 40), slice(0, 40))
    moved = (slice(6, 45), *box[1:])
    runs = [run_tiled(engine, np.ascontiguousarray(grid[b]), 16, origin=[s.start for s in b],
                      probability_classes=[1]).probabilities[0] for b in (box, moved)]
    # beyond the first tile, which the moved box cuts by one more voxel, every voxel is the same
    np.testing.assert_array_equal(runs[0][1 + 11:], runs[1][11:])
    # tiles laid from the box's own corner would have changed them
    shifted = run_tiled(engine, np.ascontiguousarray(grid[moved]), 16, probability_classes=[1]).probabilities[0]
    assert np.abs(shifted[11:] - runs[0][1 + 11:]).max() > 1e-3


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
    for entry_id, inference in (("whole", {}), ("tiled", {"tile": 24}), ("both", {"tile": 24, "mirror": True})):
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
    with pytest.raises(ModelError, match="tile edge"):   # refused as the card is read: here, before anything is copied
        registry.import_folder(folder, "bad", card={"postprocess": {"brain_mask": False}, "inference": {"tile": 3}})
    assert "bad" not in {entry.id for entry in registry.entries()} and not registry.damaged_imports()
