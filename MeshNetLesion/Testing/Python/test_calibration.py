"""``auto`` precision: bf16 only where this CPU has it and it measures faster, remembered per CPU and network."""
from __future__ import annotations

import json

import pytest
import torch

from meshnet_lesion import calibration
from meshnet_lesion.devices import cpu_has_native_bf16
from meshnet_lesion.train.model import build_meshnet

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch):
    """A CPU with native bf16 whose measurements are given by the test; counts the measurements."""
    calls = []

    def measure(model):
        calls.append(model)
        return dict(measured.times)

    measured.times = {"fp32_s": 1.0, "bf16_s": 0.5}
    measured.calls = calls
    monkeypatch.setattr(calibration, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(calibration, "measure", measure)
    return measured


def test_without_native_bf16_auto_is_fp32_and_nothing_is_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(calibration, "measure", lambda model: pytest.fail("measured without native bf16"))
    precision, note = calibration.auto_precision(build_meshnet(3).to_loaded(), CPU, tmp_path)
    assert precision == "fp32" and "no native bf16" in note
    assert not (tmp_path / calibration.CACHE_FILE).exists()


def test_bf16_is_chosen_when_clearly_faster_and_measured_once(measured, tmp_path):
    model = build_meshnet(3).to_loaded()
    assert calibration.auto_precision(model, CPU, tmp_path)[0] == "bf16"
    assert calibration.auto_precision(model, CPU, tmp_path)[0] == "bf16"
    assert len(measured.calls) == 1                      # the second answer came from the cache
    stored = json.loads((tmp_path / calibration.CACHE_FILE).read_text())
    assert stored == {calibration.network_key(model): {"fp32_s": 1.0, "bf16_s": 0.5}}


def test_fp32_is_kept_unless_bf16_saves_more_than_the_noise(measured, tmp_path):
    measured.times = {"fp32_s": 1.0, "bf16_s": 0.95}
    precision, note = calibration.auto_precision(build_meshnet(3).to_loaded(), CPU, tmp_path)
    assert precision == "fp32" and "0.95" in note


def test_each_network_shape_is_measured_and_a_damaged_cache_is_measured_again(measured, tmp_path):
    small, wide = build_meshnet(3).to_loaded(), build_meshnet(6).to_loaded()
    assert calibration.network_key(small) != calibration.network_key(wide)
    calibration.auto_precision(small, CPU, tmp_path)
    calibration.auto_precision(wide, CPU, tmp_path)
    assert len(measured.calls) == 2
    (tmp_path / calibration.CACHE_FILE).write_text("{not json")
    assert calibration.auto_precision(small, CPU, tmp_path)[0] == "bf16"
    assert len(measured.calls) == 3


def test_a_real_measurement_times_both_precisions():
    seconds = calibration.measure(build_meshnet(3).to_loaded())
    assert set(seconds) == {"fp32_s", "bf16_s"} and all(s > 0 for s in seconds.values())


def test_the_pipeline_records_how_auto_chose(registry, tmp_path):
    from meshnet_lesion import Segmenter

    segmenter = Segmenter("arc-meshnet26-r0", registry=registry, device="cpu", brain_mask=False, standardize=False)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    note = segmenter.precision_notes["arc-meshnet26-r0"]
    assert note.startswith(segmenter.engines[0].precision)
    if expected == "fp32":
        assert segmenter.engines[0].precision == "fp32"
    explicit = Segmenter("arc-meshnet26-r0", registry=registry, device="cpu", precision="fp32", brain_mask=False)
    assert explicit.precision_notes == {} and explicit.engines[0].precision == "fp32"
