"""Nothing a user has is lost, nothing hangs, and a foreseeable fault is one clear line (the reliability issue).

Each test reproduces one reported case: it failed before the fix and passes now.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meshnet_lesion import ModelError, Registry, Segmenter, Volume, load_volume, save_volume
from meshnet_lesion import cli as cli_module
from meshnet_lesion.cli import segment as segment_command
from meshnet_lesion.outputs import OutputSet, remove_leftovers
from meshnet_lesion.train.model import build_meshnet

CLI = [sys.executable, "-m", "meshnet_lesion.cli"]
FAST = ["--model", "t2lesion-meshnet11", "--device", "cpu", "--no-brain-mask"]


def run(*args, env=None, **kwargs):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("meshnet-lesion: error:"), done.stderr
    return lines[0]


@pytest.fixture()
def scan(tmp_path) -> Path:
    """A small head-like volume (no model needed to plan a run on it)."""
    data = np.zeros((48, 52, 44), np.float32)
    data[8:40, 8:44, 8:36] = 400.0
    data[20:28, 20:30, 14:22] = 900.0
    return save_volume(tmp_path / "s.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))


def _no_partials(folder: Path) -> bool:
    return not list(folder.glob(".partial-*"))


# ------------------------------------------------------------------ 1. an input or an earlier output overwritten
@pytest.mark.parametrize("flags", [["-o", "{scan}"], ["-o", "{out}", "--report", "{scan}"],
                                   ["-o", "{out}", "--probabilities", "{out}"], ["-o", "{link}"]])
def test_two_roles_on_one_file_are_refused_before_anything_runs(flags, scan, tmp_path):
    before = scan.read_bytes()
    os.link(scan, tmp_path / "hard-link.nii.gz")
    names = {"scan": scan, "out": tmp_path / "x.nii.gz", "link": tmp_path / "hard-link.nii.gz"}
    done = run("segment", scan, *[f.format(**names) for f in flags], *FAST)
    assert "are the same file" in one_error_line(done)
    assert scan.read_bytes() == before and not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------ 2. a failed later write deletes the earlier result
def test_a_failed_later_write_keeps_the_earlier_result(scan, tmp_path, registry, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = save_volume(out / "x.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    before = earlier.read_bytes()

    def full_disk(path, data):
        Path(path).write_text("{\"half\": ")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment_command, "write_json", full_disk)
    code = cli_module.main(["segment", str(scan), "-o", str(earlier), "--report", str(out / "r.json"), *FAST])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert earlier.read_bytes() == before and not (out / "r.json").exists() and _no_partials(out)


def test_an_output_that_is_a_folder_is_refused_up_front(scan, tmp_path):
    (tmp_path / "r.json").mkdir()
    done = run("segment", scan, "-o", tmp_path / "x.nii.gz", "--report", tmp_path / "r.json", *FAST)
    assert "is a folder, not a regular file" in one_error_line(done) and not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------ 3. an imported model gets stuck
def _small_model_folder(folder: Path) -> Path:
    folder.mkdir()
    build_meshnet(5).save(folder / "meshnet5.safetensors")
    (folder / ".extra.json").write_text("{}")
    (folder / "._meshnet5.safetensors").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    (folder / "notes.bin").write_bytes(b"not a weight file of this model")
    return folder


def test_import_copies_only_the_model_files_and_never_gets_stuck(tmp_path):
    registry = Registry(cache_dir=tmp_path / "cache", mirror="")
    entry = registry.import_folder(_small_model_folder(tmp_path / "m5"), "m5")
    cached = sorted(p.name for p in (tmp_path / "cache" / "imported" / "m5").iterdir())
    assert cached == ["entry.json", "meshnet5.safetensors"]
    assert registry.get("m5") == entry and registry.load("m5").num_parameters == 5_682
    assert registry.remove("m5") == "removed m5"
    registry.import_folder(tmp_path / "m5", "m5")                      # and it can come back


def test_a_damaged_import_is_listed_and_removable(tmp_path):
    cache = tmp_path / "cache"
    damaged = cache / "imported" / "broken"
    damaged.mkdir(parents=True)
    (damaged / "entry.json").write_text("{ not json")
    env = {"MESHNET_LESION_CACHE": str(cache)}
    listing = run("models", "list", env=env)
    assert listing.returncode == 0 and "damaged import broken" in listing.stdout
    assert "brainchop-mindgrab" in listing.stdout                      # the rest is still listed
    removed = run("models", "remove", "broken", env=env)
    assert removed.returncode == 0 and "removed the damaged import broken" in removed.stdout
    assert not damaged.exists()


# ------------------------------------------------------------------ 4. the mirror walk
def test_a_mirror_with_link_loops_and_dangling_links_neither_hangs_nor_fails(tmp_path, registry):
    mirror = tmp_path / "mirror"
    (mirror / "sub" / "deeper").mkdir(parents=True)
    os.symlink("..", mirror / "sub" / "a")
    os.symlink("../..", mirror / "sub" / "deeper" / "b")
    os.symlink(tmp_path / "nowhere" / "model.json", mirror / "model.json")
    shutil.copy(registry.fetch("brainchop-tissue-fast")["model.json"], mirror / "sub" / "deeper" / "model.json")
    started = time.monotonic()
    listing = run("models", "list", env={"MESHNET_LESION_MIRROR": str(mirror),
                                         "MESHNET_LESION_CACHE": str(tmp_path / "cache")}, timeout=60)
    assert listing.returncode == 0, listing.stderr
    local = Registry(cache_dir=tmp_path / "cache", mirror=mirror)
    entry = local.get("brainchop-tissue-fast")
    found = local.locate(entry, next(f for f in entry.files if f.name == "model.json"))
    assert found is not None and found.name == "model.json" and time.monotonic() - started < 30


# ------------------------------------------------------------------ 5. tracebacks instead of one line
def test_an_unwritable_output_is_one_line_before_any_compute(scan):
    done = run("segment", scan, "-o", "/proc/x.nii.gz", *FAST)
    assert "cannot write to /proc" in one_error_line(done)


def test_a_tfjs_model_without_dilation_or_bias_is_a_model_error(tmp_path, registry):
    source = registry.fetch("t2lesion-meshnet11")
    for damage in ("dilation_rate", "bias"):
        folder = tmp_path / damage
        folder.mkdir()
        config = json.loads(source["model.json"].read_text())
        layers = config["modelTopology"]["model_config"]["config"]["layers"]
        conv = next(layer for layer in layers if layer["class_name"] == "Conv3D")
        if damage == "dilation_rate":
            del conv["config"]["dilation_rate"]
        else:
            config["weightsManifest"][0]["weights"] = [w for w in config["weightsManifest"][0]["weights"]
                                                       if not w["name"].endswith("/bias")]
        (folder / "model.json").write_text(json.dumps(config))
        shutil.copy(source["model.bin"], folder / "model.bin")
        done = run("models", "import", folder, env={"MESHNET_LESION_CACHE": str(tmp_path / "cache")})
        assert "malformed" in one_error_line(done) or "manifest" in done.stderr


def test_running_out_of_memory_says_how_much_is_needed(registry, monkeypatch):
    from meshnet_lesion import engine as engine_module

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:124] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4294967296 bytes")

    segmenter = Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", brain_mask=False)
    monkeypatch.setattr(engine_module.Engine, "_run", no_memory)
    volume = Volume(np.random.default_rng(0).random((40, 40, 40), dtype=np.float32), np.eye(4))
    from meshnet_lesion import MeshNetLesionError

    with pytest.raises(MeshNetLesionError, match=r"not enough memory: this model needs about [\d.]+ GiB"):
        segmenter.segment(volume)


def test_a_real_memory_limit_is_one_line_and_writes_nothing(sample_paths, tmp_path):
    """As reported: ``ulimit -v 1500000`` (1.5 GB of address space) on the default pipeline."""
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))  # noqa: E731
    done = run("segment", sample_paths["sample-arc-m2265-t2w"], "-o", tmp_path / "x.nii.gz", "--device", "cpu", "-q",
               preexec_fn=limit, timeout=300)
    assert "not enough memory" in one_error_line(done) and "GiB" in done.stderr
    assert not (tmp_path / "x.nii.gz").exists() and _no_partials(tmp_path)


def test_clear_cache_racing_a_download_is_retried_then_reported(tmp_path, monkeypatch):
    registry = Registry(cache_dir=tmp_path / "cache", mirror="")
    (tmp_path / "cache" / "files" / "x").mkdir(parents=True)
    real = shutil.rmtree
    calls = []

    def racing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:                                    # a download re-created a file meanwhile
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", racing)
    registry.clear_cache()
    assert len(calls) == 2 and not (tmp_path / "cache" / "files").exists()
    (tmp_path / "cache" / "files").mkdir()
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOTEMPTY, "busy")))
    with pytest.raises(ModelError, match="is a download running"):
        registry.clear_cache()


# ------------------------------------------------------------------ 6. permissions
@pytest.mark.slow
def test_outputs_honour_the_umask(scan, tmp_path, shared):
    out = tmp_path / "out"
    out.mkdir()
    done = run("segment", scan, "-o", out / "x.nii.gz", "--report", out / "r.json", "--preview", out / "p.png", *FAST,
               preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    for name in ("x.nii.gz", "r.json", "p.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------ 7. what an import copies, and what it accepts
def test_import_refuses_links_out_of_the_folder(tmp_path):
    folder = _small_model_folder(tmp_path / "m5")
    os.symlink("/etc/passwd", folder / "passwd.bin")
    with pytest.raises(ModelError, match="outside"):
        Registry(cache_dir=tmp_path / "cache", mirror="").import_folder(folder, "m5")


@pytest.mark.parametrize("widths", [[1, 100_000, 2], [1] + [2] * 1000])
def test_import_refuses_absurd_models(widths, tmp_path):
    layers = [{"in_channels": a, "out_channels": b, "kernel_size": 1, "dilation": 1, "bias": True, "norm": "none",
               "activation": "relu"} for a, b in zip(widths, widths[1:])]
    from safetensors.numpy import save_file

    from meshnet_lesion.formats.meshnet import SPEC_METADATA_KEY

    folder = tmp_path / "absurd"
    folder.mkdir()
    spec = {"format": "meshnet-spec/1", "layers": layers, "normalization": {"method": "minmax"}}
    save_file({"layers.0.conv.weight": np.zeros((1, 1, 1, 1, 1), np.float32)}, str(folder / "m.safetensors"),
              metadata={SPEC_METADATA_KEY: json.dumps(spec)})
    with pytest.raises(ModelError, match="implausible"):
        Registry(cache_dir=tmp_path / "cache", mirror="").import_folder(folder, "absurd")


# ------------------------------------------------------------------ 8. minor
def test_leftovers_of_a_killed_run_are_cleaned_and_a_live_runs_are_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".partial-{dead.pid}-abcd1234-x.nii.gz"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".partial-{os.getppid()}-abcd1234-y.nii.gz"
    live.write_bytes(b"someone is writing this")
    assert remove_leftovers([tmp_path]) == 1
    assert not stale.exists() and live.exists()


def test_a_kill_between_writing_and_renaming_leaves_the_earlier_file_and_the_next_run_cleans_up(tmp_path):
    target = save_volume(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    before = target.read_bytes()
    script = (
        "import os, signal, numpy as np\n"
        "from meshnet_lesion import outputs, save_volume\n"
        "outputs.publish = lambda partial, target: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"save_volume({str(target)!r}, np.ones((4, 4, 4), np.uint8), np.eye(4))\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == before and list(tmp_path.glob(".partial-*"))   # the old file, a partial beside it
    remove_leftovers([tmp_path])
    assert _no_partials(tmp_path) and target.read_bytes() == before


def test_a_full_disk_mid_file_leaves_nothing_partial(tmp_path, monkeypatch):
    from meshnet_lesion import volume as volume_module

    target = save_volume(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    before = target.read_bytes()

    def half_then_full(path, *args):
        Path(path).write_bytes(b"\x1f\x8b half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume_module, "_save_nifti", half_then_full)
    with pytest.raises(OSError, match="No space"):
        save_volume(target, np.ones((4, 4, 4), np.uint8), np.eye(4))
    assert target.read_bytes() == before and _no_partials(tmp_path)
    with OutputSet() as outputs:                                  # a set of outputs: all or nothing
        first = outputs.stage(tmp_path / "a.json")
        first.write_text("{}")
    assert not (tmp_path / "a.json").exists() and _no_partials(tmp_path)


def test_removing_a_built_in_model_says_it_cannot(tmp_path):
    done = run("models", "remove", "brainchop-tissue-fast", env={"MESHNET_LESION_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0 and "is built in and cannot be removed" in done.stdout


def test_an_offline_site_is_told_where_it_looked_and_how_to_point_at_a_copy(tmp_path):
    models = {"schema_version": 1, "models": [{"id": "far", "task": "tissue", "default": True, "files": [
        {"name": "model.json", "sha256": "0" * 64, "url": "http://127.0.0.1:9/model.json"}]}], "samples": []}
    (tmp_path / "models.json").write_text(json.dumps(models))
    local = Registry(tmp_path / "models.json", cache_dir=tmp_path / "cache", mirror="")
    with pytest.raises(ModelError) as raised:
        local.fetch("far")
    message = str(raised.value)
    assert "MESHNET_LESION_MIRROR" in message and str(tmp_path / "cache") in message and "\n" not in message
    assert _no_partials(tmp_path / "cache" / "files" / "far")


def test_quiet_hides_progress_but_keeps_the_result_line(scan, tmp_path, shared):
    done = run("segment", scan, "-o", tmp_path / "x.nii.gz", "-q", *FAST)
    assert done.returncode == 0 and done.stderr == "" and "mL in" in done.stdout
    talkative = run("segment", scan, "-o", tmp_path / "y.nii.gz", *FAST)     # not a terminal: one line per stage
    assert talkative.returncode == 0 and "s.nii.gz: segmenting" in talkative.stderr


def test_models_list_has_headers_and_show_is_a_readable_card(tmp_path):
    env = {"MESHNET_LESION_CACHE": str(tmp_path / "cache")}
    listing = run("models", "list", env=env).stdout.splitlines()
    assert listing[0].split()[:3] == ["ID", "KIND", "TASK"] and any(line.startswith("* arc-meshnet26 ") for line in listing)
    card = run("models", "show", "arc-meshnet26-r0", env=env).stdout
    assert "input convention:" in card and "0.667" in card and not card.lstrip().startswith("{")
    assert json.loads(run("models", "show", "arc-meshnet26-r0", "--json", env=env).stdout)["id"] == "arc-meshnet26-r0"
    assert "``" not in run("--help").stdout


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    """``meshnet-lesion models list | head -3`` printed a BrokenPipeError traceback."""
    child = subprocess.Popen([*CLI, "models", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "MESHNET_LESION_CACHE": str(tmp_path / "cache")})
    child.stdout.close()                                   # the reader is gone before the first line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == cli_module.EXIT_BROKEN_PIPE and stderr == "", stderr


def test_one_segmenter_may_be_shared_between_threads(registry):
    segmenter = Segmenter("t2lesion-meshnet11", registry=registry, device="cpu", brain_mask=False)
    data = np.zeros((56, 60, 50), np.float32)
    data[10:46, 10:50, 8:42] = 300.0
    data[24:34, 26:36, 18:28] = 800.0
    volume = Volume(data, np.eye(4))
    results: list = [None] * 3

    def work(index: int) -> None:
        results[index] = segmenter.segment(volume, probabilities=True).probabilities

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(r is not None for r in results)
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_load_volume_refuses_a_header_claiming_an_impossible_size(tmp_path):
    from meshnet_lesion import InputError

    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(path))
    with open(path, "rb") as handle:
        header = nib.Nifti1Header.from_fileobj(handle)
    header.set_data_shape((30000, 30000, 30000))
    with open(path, "r+b") as handle:
        handle.write(header.binaryblock)
    with pytest.raises(InputError, match="more than any MRI"):
        load_volume(path)


def test_quiet_silences_the_download_message_too(scan, tmp_path):
    """No mirror, an empty cache: the download is attempted (and fails offline, or succeeds); -q shows no
    'Downloading data from …' line either way."""
    env = {"MESHNET_LESION_MIRROR": "", "MESHNET_LESION_CACHE": str(tmp_path / "cache")}
    done = run("segment", scan, "-o", tmp_path / "x.nii.gz", "-q", *FAST, env=env, timeout=600)
    assert "Downloading" not in done.stderr
    assert done.returncode == 0 or len(done.stderr.strip().splitlines()) == 1
