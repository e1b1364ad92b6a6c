"""Reliability, second round: study mode never overwrites a scan, only regular files are replaced, no hang, no
silent corruption, one clear line instead of a traceback.

Each test reproduces a case a fault probe found (numbered as in the issue); it failed before the fix.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from meshnet_lesion import save_volume
from meshnet_lesion.errors import InputError, OutputError
from meshnet_lesion.outputs import partial_path, publish
from meshnet_lesion.study import cohort
from meshnet_lesion.study.scans import find_bids, read_manifest

CLI = [sys.executable, "-m", "meshnet_lesion.cli"]
FAST = ["--model", "t2lesion-meshnet11", "--device", "cpu", "--no-brain-mask", "--no-mirror"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(*args, env=None, prefix=(), timeout=600, **kwargs):
    return subprocess.run([*prefix, *CLI, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, **kwargs)


def one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("meshnet-lesion: error:"), done.stderr
    return lines[0]


def _scan(path: Path) -> Path:
    data = np.zeros((48, 52, 44), np.float32)
    data[8:40, 8:44, 8:36] = 400.0
    data[20:28, 20:30, 14:22] = 900.0
    return save_volume(path, data, np.eye(4))


@pytest.fixture()
def scan(tmp_path) -> Path:
    return _scan(tmp_path / "s.nii.gz")


def _manifest(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "output"])
        writer.writerows(rows)
    return path


def _state(paths) -> dict:
    """What stands at each path: its kind and, for a regular file, its bytes."""
    found = {}
    for path in paths:
        mode = os.lstat(path).st_mode
        found[str(path)] = (stat.S_IFMT(mode), Path(path).read_bytes() if stat.S_ISREG(mode) else None)
    return found


# ------------------------------------------------------------------ 1. manifest mode compares its paths
@pytest.mark.parametrize("rows, message", [
    ([("a.nii.gz", "a.nii.gz")], "is the input of scan 1"),                        # its own input
    ([("a.nii.gz", "b.nii.gz"), ("b.nii.gz", "bb.nii.gz")], "is the input of scan 2"),  # a later row's input
    ([("a.nii.gz", "out.nii.gz"), ("b.nii.gz", "out.nii.gz")], "is also scan 1's label map"),  # one output twice
    ([("a.nii.gz", "hard.nii.gz")], "is the input of scan 1"),                     # a hard link to the input
])
def test_a_manifest_that_would_overwrite_a_scan_or_a_result_is_refused(rows, message, tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        _scan(tmp_path / name)
    os.link(tmp_path / "a.nii.gz", tmp_path / "hard.nii.gz")
    before = _state([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    done = run("segment", _manifest(tmp_path / "s.csv", rows), "-o", tmp_path / "deriv", *FAST)
    assert message in one_error_line(done) and "nothing was run" in done.stderr
    assert _state([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]) == before
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "bb.nii.gz").exists()


# ------------------------------------------------------------------ 2. only a regular file is ever replaced
def _hazard(folder: Path, kind: str, suffix: str) -> Path:
    """Something other than a regular file where an output goes."""
    if kind == "/dev/null":
        return Path("/dev/null")
    path = folder / f"{kind.replace(' ', '-')}{suffix}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to stdout":
        path.symlink_to("/proc/self/fd/1")
    else:
        path.symlink_to(folder / f"nowhere{suffix}")
    return path


@pytest.mark.parametrize("flag, hazard", [(flag, hazard) for flag in ("--report", "-o")
                                          for hazard in ("fifo", "link to stdout", "dangling link", "/dev/null")
                                          if (flag, hazard) != ("-o", "/dev/null")])
def test_an_output_path_that_is_not_a_regular_file_is_refused_before_compute(flag, hazard, scan, tmp_path):
    target = _hazard(tmp_path, hazard, ".json" if flag == "--report" else ".nii.gz")
    before = _state([target])
    outputs = ["-o", target] if flag == "-o" else ["-o", tmp_path / "x.nii.gz", "--report", target]
    done = run("segment", scan, *outputs, *FAST, timeout=120)
    assert "not a regular file" in one_error_line(done) and "nothing was run" in done.stderr
    assert _state([target]) == before
    assert not (tmp_path / "x.nii.gz").exists() and not list(tmp_path.glob(".partial-*"))


def test_the_rename_itself_refuses_to_replace_anything_but_a_regular_file(tmp_path):
    """The last line of defence, for any output mode: publish() checks again just before the rename."""
    fifo = tmp_path / "late.fifo"
    os.mkfifo(fifo)
    partial = partial_path(fifo)
    partial.write_text("{}")
    with pytest.raises(OutputError, match="FIFO"):
        publish(partial, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    regular = tmp_path / "ok.json"
    assert publish(partial, regular).read_text() == "{}"


def test_a_manifest_row_writing_onto_a_fifo_is_refused_before_any_scan_runs(tmp_path):
    _scan(tmp_path / "a.nii.gz")
    _scan(tmp_path / "b.nii.gz")
    os.mkfifo(tmp_path / "b_out.json")   # the sidecar of row 2
    done = run("segment", _manifest(tmp_path / "s.csv", [("a.nii.gz", "a_out.nii.gz"), ("b.nii.gz", "b_out.nii.gz")]),
               "-o", tmp_path / "deriv", *FAST, timeout=120)
    assert "FIFO" in one_error_line(done)
    assert not (tmp_path / "a_out.nii.gz").exists()   # not even the first row ran
    assert stat.S_ISFIFO(os.lstat(tmp_path / "b_out.json").st_mode)


# ------------------------------------------------------------------ 3. a detached data file that is a FIFO
def test_an_nhdr_whose_data_file_is_a_fifo_is_refused_not_read_forever(tmp_path):
    os.mkfifo(tmp_path / "fifo.raw")
    (tmp_path / "fifo.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                                        "endian: little\nspace: left-posterior-superior\n"
                                        "space directions: (1,0,0) (0,1,0) (0,0,1)\ndata file: fifo.raw\n")
    done = run("segment", tmp_path / "fifo.nhdr", "-o", tmp_path / "x.nii.gz", *FAST, timeout=60)
    assert "data file" in one_error_line(done) and "FIFO" in done.stderr


# ------------------------------------------------------------------ 4. a damaged gzip stream
def test_a_nifti_whose_gzip_crc_fails_is_refused(scan, tmp_path):
    data = bytearray(scan.read_bytes())
    data[-8] ^= 0xFF   # the trailer's CRC-32
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(bytes(data))
    assert subprocess.run(["gzip", "-t", str(damaged)], capture_output=True).returncode != 0
    done = run("segment", damaged, "-o", tmp_path / "x.nii.gz", *FAST)
    assert "integrity check" in one_error_line(done)


def test_a_scan_changed_after_compression_with_its_old_crc_is_refused(scan, tmp_path):
    """A bright cube written into the voxels and the stream recompressed with the old CRC kept: the reader sees
    plausible voxels; only the trailer tells."""
    original = scan.read_bytes()
    raw = bytearray(gzip.decompress(original))
    header = 352
    voxels = np.frombuffer(raw, np.float32, offset=header).copy().reshape((48, 52, 44), order="F")
    voxels[10:30, 10:30, 10:30] = 5000.0
    raw[header:] = voxels.tobytes(order="F")
    tampered = bytearray(gzip.compress(bytes(raw)))
    tampered[-8:-4] = original[-8:-4]          # the old CRC-32, the right length
    (tmp_path / "tampered.nii.gz").write_bytes(bytes(tampered))
    done = run("segment", tmp_path / "tampered.nii.gz", "-o", tmp_path / "x.nii.gz", *FAST)
    assert "integrity check" in one_error_line(done) and not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------ 5. a damaged finished mask on resume
def test_a_truncated_finished_mask_is_segmented_again_and_the_report_says_so(tmp_path):
    bids = tmp_path / "bids"
    _scan((bids / "sub-01" / "anat").mkdir(parents=True) or bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    output = tmp_path / "deriv"
    assert run("segment", bids, "-o", output, *FAST, "-q").returncode == 0
    mask = output / "sub-01" / "anat" / "sub-01_desc-lesion_mask.nii.gz"
    sidecar = json.loads(mask.with_name("sub-01_desc-lesion_mask.json").read_text())
    assert "sub-01_desc-lesion_mask.nii.gz" in sidecar["meshnet-lesion"]["outputs_sha256"]
    good = mask.read_bytes()
    mask.write_bytes(good[: len(good) // 2])   # truncated after it was finished
    report = run("report", output)
    assert report.returncode == 2 and "damaged" in report.stdout and "sub-01_desc-lesion_mask" in report.stdout
    again = run("segment", bids, "-o", output, *FAST)
    assert again.returncode == 0 and "1 segmented, 0 already current" in again.stderr
    assert mask.read_bytes() == good and run("report", output).returncode == 0


# ------------------------------------------------------------------ 6. one line instead of a traceback
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions")
def test_an_input_in_a_folder_that_cannot_be_entered_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    _scan(locked / "s.nii.gz")
    locked.chmod(0)
    tmp_path.chmod(0o755)
    try:
        done = run("segment", locked / "s.nii.gz", "-o", "/tmp/never.nii.gz", *FAST,
                   prefix=NOBODY if os.geteuid() == 0 else ())
    finally:
        locked.chmod(0o755)
    assert "permission denied" in one_error_line(done).lower()


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions")
def test_an_unreadable_scan_says_permission_denied(tmp_path):
    unreadable = _scan(tmp_path / "s.nii.gz")
    unreadable.chmod(0)
    tmp_path.chmod(0o755)
    done = run("segment", unreadable, "-o", "/tmp/never.nii.gz", *FAST, prefix=NOBODY if os.geteuid() == 0 else ())
    assert "permission denied" in one_error_line(done).lower()


def test_an_output_name_longer_than_the_file_system_allows_is_refused_up_front(scan, tmp_path):
    done = run("segment", scan, "-o", tmp_path / ("x" * 300 + ".nii.gz"), *FAST)
    assert "longer than this file system allows" in one_error_line(done)


def test_a_slurm_task_id_that_is_not_a_number_is_one_line(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    _scan(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    done = run("segment", bids, "-o", tmp_path / "deriv", *FAST,
               env={"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert "SLURM_ARRAY_TASK_ID='abc'" in one_error_line(done)


def test_models_import_into_a_cache_that_cannot_be_written_is_one_line(tmp_path, shared):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run("models", "import", shared / "models" / "t2lesion-meshnet11", "--id", "mine",
               env={"MESHNET_LESION_CACHE": str(blocker / "cache")})
    assert "cannot write to the model cache" in one_error_line(done)


def test_too_low_a_memory_limit_to_load_pytorch_is_one_line_saying_so(scan, tmp_path):
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (300_000 * 1024, 300_000 * 1024)); "
            "from meshnet_lesion.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "segment", str(scan), "-o", str(tmp_path / "x.nii.gz"), *FAST],
                          capture_output=True, text=True)
    line = one_error_line(done)
    assert "memory" in line.lower() and ("ulimit" in line or "not enough memory" in line), line


# ------------------------------------------------------------------ 7. long but valid output names work
def test_an_output_name_of_250_bytes_is_written(scan, tmp_path):
    target = tmp_path / ("y" * (250 - len(".nii.gz")) + ".nii.gz")
    report = tmp_path / ("r" * (255 - len(".json")) + ".json")
    done = run("segment", scan, "-o", target, "--report", report, *FAST)
    assert done.returncode == 0, done.stderr
    assert target.is_file() and json.loads(report.read_text())["output"] == str(target)
    assert len(partial_path(target).name) < 40


# ------------------------------------------------------------------ 8. messages that name the problem
def test_input_problems_are_named(tmp_path, scan):
    (tmp_path / "loop.nii.gz").symlink_to(tmp_path / "loop.nii.gz")
    os.mkfifo(tmp_path / "pipe.nii.gz")
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    for name, words in (("loop.nii.gz", "symbolic link loop"), ("pipe.nii.gz", "FIFO"),
                        ("gone.nii.gz", "symbolic link to a missing file"), ("absent.nii.gz", "no such file")):
        done = run("segment", tmp_path / name, "-o", tmp_path / "x.nii.gz", *FAST, timeout=60)
        assert words in one_error_line(done), (name, done.stderr)


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_a_mirror_that_is_not_a_folder_is_named_not_ignored(kind, tmp_path):
    mirror = tmp_path / "mirror"
    if kind == "file":
        mirror.write_text("not a folder")
    done = run("models", "fetch", "t2lesion-meshnet11",
               env={"MESHNET_LESION_MIRROR": str(mirror), "MESHNET_LESION_CACHE": str(tmp_path / "cache")})
    line = one_error_line(done)
    assert "MESHNET_LESION_MIRROR" in line and str(mirror) in line and "not a folder" in line
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.bin"))


# ------------------------------------------------------------------ 9. SIGTERM while writing
def test_sigterm_while_writing_leaves_no_partial_file(scan, tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from meshnet_lesion import cli
        from meshnet_lesion.cli import segment

        real = segment.write_json
        def slow(path, data):   # a slow disk: the report's partial file exists for a while
            open(path, "w").write("{")
            time.sleep(30)
            return real(path, data)
        segment.write_json = slow
        sys.exit(cli.main(sys.argv[1:]))
    """)
    process = subprocess.Popen([sys.executable, "-c", code, "segment", str(scan), "-o", str(tmp_path / "x.nii.gz"),
                                "--report", str(tmp_path / "r.json"), *FAST], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".partial-*.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143
    assert "terminated" in process.stderr.read()
    assert not list(tmp_path.glob(".partial-*")) and not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------ 10. a negative shard
def test_a_negative_shard_is_told_what_is_wrong(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    _scan(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    done = run("segment", bids, "-o", tmp_path / "deriv", "--shard", "-1/2", *FAST)
    assert "--shard '-1/2': use I/N with 0 <= I < N" in one_error_line(done)


# ------------------------------------------------------------------ two runs on one study
def test_a_scan_another_live_run_holds_is_passed_over_and_a_dead_runs_lock_is_taken_over(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    _scan(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    output = tmp_path / "deriv"
    (scan,) = find_bids(bids, output).scans
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with cohort.scan_lock(scan) as first:          # this process holds it: a second holder is refused
            assert first is None
            lock = next(scan.mask.parent.glob(".lock-*"))
            with cohort.scan_lock(scan) as second:
                assert second is not None and second.startswith(f"{os.getpid()}@")
        assert not lock.exists()
        lock.write_text(f"{holder.pid}@{os.uname().nodename}")   # another live run holds the scan
        done = run("segment", bids, "-o", output, *FAST)
        assert done.returncode == 0 and "1 being segmented by another run" in done.stderr
        assert not scan.mask.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    done = run("segment", bids, "-o", output, *FAST)   # its process is gone: the lock is stale
    assert done.returncode == 0 and "1 segmented" in done.stderr and scan.mask.exists() and not lock.exists()


def test_check_outputs_is_the_study_modes_gate(tmp_path):
    """The same check the command line calls, for any front end running a Cohort."""
    _scan(tmp_path / "a.nii.gz")
    found = read_manifest(_manifest(tmp_path / "m.csv", [("a.nii.gz", "a.nii.gz")]))
    with pytest.raises(InputError, match="is the input of scan 1"):
        cohort.check_outputs(found.scans, probseg=False)
