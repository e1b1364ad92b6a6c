"""A study from the command line: a small BIDS tree of real scans in, BIDS derivatives out; reruns,
resumes, shards, manifests, the cohort table, and the same jobs through submitit's local executor."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meshnet_lesion.cli import main
from meshnet_lesion.errors import InputError
from meshnet_lesion.registry import sha256_of
from meshnet_lesion.study import cohort
from meshnet_lesion.study.scans import find_bids, shard_of

# the fastest real lesion model, without the brain mask and the mirrored pass: the study machinery is tested here
MODEL = ["--model", "t2lesion-meshnet11", "--no-brain-mask", "--no-mirror", "--device", "cpu", "--precision", "fp32"]
GOOD = ("sub-01/ses-1/anat/sub-01_ses-1_acq-spc3p2_run-1_T2w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-spc3p2_T2w.nii.gz",
        "sub-02/anat/sub-02_T2w.nii.gz")
TSE = "sub-01/ses-1/anat/sub-01_ses-1_acq-tse3_run-1_T2w.nii.gz"
CORRUPT = "sub-03/ses-1/anat/sub-03_ses-1_T2w.nii.gz"


def _mask_of(relative: str) -> str:
    return relative.replace("_T2w.nii.gz", "_desc-lesion_mask.nii.gz")


@pytest.fixture(scope="module")
def bids(sample_paths, tmp_path_factory):
    """Slabs of the real ARC scan (so each runs in seconds) as three subjects' T2w, a TSE beside a SPACE
    scan (to be skipped), and a corrupt file (to fail alone)."""
    root = tmp_path_factory.mktemp("study") / "bids"
    image = nib.load(sample_paths["sample-arc-m2265-t2w"])
    slabs = {GOOD[0]: image.slicer[90:138, 40:200, 40:200], GOOD[1]: image.slicer[100:148, 50:210, 40:200],
             TSE: image.slicer[96:144, 40:200, 40:200], GOOD[2]: image.slicer[84:132, 40:200, 50:210]}
    for relative, slab in slabs.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(slab.dataobj), slab.affine), root / relative)
    (root / CORRUPT).parent.mkdir(parents=True)
    (root / CORRUPT).write_bytes(gzip.compress(b"not a NIfTI image")[:40])
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    return root


@pytest.fixture(scope="module")
def derivatives(bids, tmp_path_factory):
    """One run over the whole study (shared by the tests that only read it); returns its folder and the
    machine-readable lines it printed."""
    output = tmp_path_factory.mktemp("deriv") / "meshnet"
    done = subprocess.run([sys.executable, "-m", "meshnet_lesion.cli", "segment", str(bids), "-o", str(output),
                           *MODEL], capture_output=True, text=True, env=os.environ.copy())
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return output, done, lines


def _mtimes(folder):
    """Every output's modification time (the failure records of logs/ are rewritten by each retry)."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts}


def test_a_bids_study_becomes_derivatives_with_sidecars(bids, derivatives):
    output, done, lines = derivatives
    assert done.returncode == 2, done.stderr                      # one scan failed, the rest went on
    assert sorted(line["status"] for line in lines) == ["done", "done", "done", "failed"]
    assert "skipped" in done.stderr and "tse3" in done.stderr     # the TSE beside a SPACE scan
    assert not (output / _mask_of(TSE)).exists()
    for relative in GOOD:
        mask = nib.load(output / _mask_of(relative))
        source = nib.load(bids / relative)
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        sidecar = json.loads((output / _mask_of(relative)).with_suffix("").with_suffix(".json").read_text())
        ours = sidecar["meshnet-lesion"]
        assert sidecar["Type"] == "Lesion" and sidecar["Sources"] == [f"bids:raw:{relative}"]
        assert ours["model"] == "t2lesion-meshnet11" and ours["input_sha256"] == sha256_of(bids / relative)
        assert ours["lesion_volume_ml"] >= 0 and ours["timings_s"]["total"] > 0 and ours["software"]["torch"]
    failed = json.loads((output / "logs" / "failed" / "sub-03_ses-1_desc-lesion_mask.json").read_text())
    assert failed["input"] == CORRUPT and failed["error"]
    description = json.loads((output / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "meshnet-lesion"
    assert description["DatasetLinks"]["raw"] == bids.resolve().as_uri()
    assert not list(output.rglob("*.partial*"))


def test_the_derivatives_pass_the_bids_validator(derivatives):
    validator = shutil.which("bids-validator-deno", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                                         f"{os.environ.get('PATH', '')}")
    if validator is None:
        pytest.skip("bids-validator-deno is not installed (pip install meshnet-lesion[test])")
    output = derivatives[0]
    checked = subprocess.run([validator, "--json", str(output)], capture_output=True, text=True, timeout=300)
    issues = json.loads(checked.stdout)["issues"]["issues"]
    errors = [issue for issue in issues if issue.get("severity") == "error"]
    assert not errors, errors


def test_a_rerun_does_nothing_and_overwrite_runs_again(bids, derivatives, tmp_path):
    output = tmp_path / "meshnet"
    shutil.copytree(derivatives[0], output)
    before = _mtimes(output)
    assert main(["segment", str(bids), "-o", str(output), *MODEL, "-q"]) == 2      # the corrupt file still fails
    assert _mtimes(output) == before
    assert main(["segment", str(bids), "-o", str(output), *MODEL, "-q", "--participant-label", "02",
                 "--overwrite"]) == 0
    changed = {p for p, t in _mtimes(output).items() if before.get(p) != t}
    assert {p.name for p in changed} == {"sub-02_desc-lesion_mask.nii.gz", "sub-02_desc-lesion_mask.json",
                                         "sub-02_desc-lesion_mask.png"}


def test_a_changed_option_or_input_is_segmented_again(bids, derivatives, tmp_path):
    output = tmp_path / "meshnet"
    shutil.copytree(derivatives[0], output)
    sidecar = (output / _mask_of(GOOD[2])).with_suffix("").with_suffix(".json")
    before = sidecar.stat().st_mtime_ns
    assert main(["segment", str(bids), "-o", str(output), *MODEL, "-q", "--participant-label", "sub-02",
                 "--min-lesion-ml", "0.5"]) == 0
    assert sidecar.stat().st_mtime_ns != before
    assert json.loads(sidecar.read_text())["meshnet-lesion"]["options"]["min_lesion_ml"] == 0.5


def test_a_changed_way_of_running_the_model_changes_the_signature(registry, tmp_path):
    """The card's tiles or mirrored pass decide a result as its weights do: a card that changes them re-runs."""
    from meshnet_lesion import Segmenter

    segmenter = Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", mirror=False)
    first = cohort.Cohort(segmenter, tmp_path, {}).signature("0" * 64)
    segmenter.tile = 64
    assert cohort.Cohort(segmenter, tmp_path, {}).signature("0" * 64) != first
    segmenter.tile, segmenter.mirror = None, True
    assert cohort.Cohort(segmenter, tmp_path, {}).signature("0" * 64) != first


def test_a_killed_run_resumes_where_it_stopped(bids, registry, tmp_path, monkeypatch):
    from meshnet_lesion import Segmenter, preview

    output = tmp_path / "meshnet"
    scans = find_bids(bids, output).scans[:2]
    runner = cohort.Cohort(Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", precision="fp32",
                                     brain_mask=False, mirror=False), output, {"test": 1})
    real_preview = preview.write_preview

    calls = []

    def killed_on_the_second(path, *args):           # as if killed while writing the second scan's files
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_preview(path, *args)

    monkeypatch.setattr(preview, "write_preview", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        runner.run(scans)
    assert scans[0].sidecar.exists() and not scans[1].mask.exists()
    monkeypatch.setattr(preview, "write_preview", real_preview)
    tally = runner.run(scans)
    assert (tally.skipped, tally.done, tally.failed) == (1, 1, 0)
    assert all(scan.sidecar.exists() for scan in scans) and not list(output.rglob("*.partial*"))


def test_shards_cover_every_scan_exactly_once(bids, tmp_path):
    scans = find_bids(bids, tmp_path).scans
    assert len(scans) == 4 and [s.label for s in scans] == sorted(s.label for s in scans)
    shards = [shard_of(scans, f"{i}/3") for i in range(3)]
    assert sorted(s.label for shard in shards for s in shard) == sorted(s.label for s in scans)
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert shard_of(scans, None, slurm) == shards[1]
    assert shard_of(scans, None, {}) == scans
    for bad in ("3/3", "1", "-1/2", "a/b"):
        with pytest.raises(InputError, match="--shard"):
            shard_of(scans, bad)


def test_two_shards_on_the_command_line_write_the_whole_study(bids, derivatives, tmp_path):
    output = tmp_path / "meshnet"
    codes = [main(["segment", str(bids), "-o", str(output), *MODEL, "-q", "--shard", f"{i}/2"]) for i in range(2)]
    assert sorted(codes) == [0, 2]                                # the corrupt scan fails in one shard
    written = sorted(p.relative_to(output) for p in output.rglob("*_mask.nii.gz"))
    assert written == sorted(p.relative_to(derivatives[0]) for p in derivatives[0].rglob("*_mask.nii.gz"))


def test_filters_and_acquisitions(bids, tmp_path):
    found = find_bids(bids, tmp_path, acquisitions=["tse3"])
    assert [s.label for s in found.scans] == [TSE] and not found.skipped
    found = find_bids(bids, tmp_path, participants=["sub-01"], sessions=["1"])
    assert [s.label for s in found.scans] == [GOOD[0]] and [p.name for p, _ in found.skipped] == [TSE.split("/")[-1]]
    with pytest.raises(InputError, match="not a BIDS dataset"):
        find_bids(tmp_path, tmp_path / "out")
    assert main(["segment", str(bids), "-o", str(bids / "sub-01"), *MODEL]) == 2   # never into the raw data


def test_a_csv_manifest_runs_the_same_jobs(bids, tmp_path):
    manifest = tmp_path / "scans.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "output"])
        writer.writerow([bids / GOOD[2], "out/second_lesion.nii.gz"])
    assert main(["segment", str(manifest), "-o", str(tmp_path / "deriv"), *MODEL, "-q", "--probseg"]) == 0
    out = tmp_path / "out"
    assert (out / "second_lesion.nii.gz").exists() and (out / "second_lesion.json").exists()
    probabilities = np.asarray(nib.load(out / "second_lesion_probseg.nii.gz").dataobj)
    labels = np.asarray(nib.load(out / "second_lesion.nii.gz").dataobj)
    assert probabilities.shape == labels.shape and 0 <= probabilities.min() and probabilities.max() <= 1
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.nii.gz\n")
    assert main(["segment", str(bad), "-o", str(tmp_path / "deriv"), *MODEL]) == 2


def test_the_report_merges_the_sidecars_into_a_table_and_a_mosaic(derivatives, tmp_path, capsys):
    output = tmp_path / "meshnet"
    shutil.copytree(derivatives[0], output)
    assert main(["report", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "4 scan(s) from 3 participant(s): 3 segmented, 1 failed" in printed
    with open(output / "lesions.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["participant"], r["session"], r["status"]) for r in rows] == [
        ("01", "1", "done"), ("01", "2", "done"), ("02", "", "done"), ("03", "1", "failed")]
    sidecar = json.loads((output / _mask_of(GOOD[0])).with_suffix("").with_suffix(".json").read_text())
    assert float(rows[0]["lesion_ml"]) == sidecar["meshnet-lesion"]["lesion_volume_ml"]
    assert rows[3]["lesion_ml"] == "n/a" and rows[0]["model"] == "t2lesion-meshnet11"
    assert (output / "lesions_mosaic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path)]) == 2                   # not a derivatives folder


def test_the_same_jobs_run_through_submitits_local_executor(bids, derivatives, tmp_path, capsys):
    pytest.importorskip("submitit")
    output = tmp_path / "meshnet"
    code = main(["submit", str(bids), "-o", str(output), *MODEL, "--local", "--wait", "--scans-per-task", "2"])
    printed = capsys.readouterr().out
    assert "submitted 2 task(s) for 4 scan(s)" in printed and "1 of 2 task(s) ended cleanly" in printed
    assert code == 2                                              # the task with the corrupt scan
    written = sorted(p.relative_to(output) for p in output.rglob("*_mask.nii.gz"))
    assert written == sorted(p.relative_to(derivatives[0]) for p in derivatives[0].rglob("*_mask.nii.gz"))
    assert main(["submit", str(bids), "-o", str(output), *MODEL]) == 2           # no partition, not --local
