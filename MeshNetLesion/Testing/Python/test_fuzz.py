"""Fuzzing the readers that take untrusted bytes: scans (NIfTI, NRRD, MGH) and model files (brainchop and
TensorFlow.js ``model.json``, our safetensors metadata, PyTorch checkpoints).

Random and mutated files may load or be refused with the project's own errors, and nothing else: no
other exception, no hang (a deadline per input), never unpickled code (a payload that would create a
marker file is spliced into checkpoints; the marker must never appear).

``make test`` tries ``MESHNET_FUZZ_EXAMPLES`` inputs per reader (default 40, derandomised so CI is
repeatable); ``make fuzz`` runs thousands with fresh randomness.
"""
from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet_lesion import MeshNetLesionError, load_model_files, load_volume
from meshnet_lesion.formats.meshnet import SPEC_METADATA_KEY
from meshnet_lesion.train.model import build_meshnet

EXAMPLES = int(os.environ.get("MESHNET_FUZZ_EXAMPLES", "40"))
LONG_RUN = EXAMPLES > 1000
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=not LONG_RUN, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _count_inputs():
    """Prints (with ``-s``; ``make fuzz`` shows it) how many inputs each reader was given."""
    yield
    print("\nfuzz inputs tried:", json.dumps(TRIED, sort_keys=True), "total", sum(TRIED.values()))


# ------------------------------------------------------------------ mutations
@st.composite
def mutated_bytes(draw, seed: bytes) -> bytes:
    """The seed with a few bytes replaced, a run inserted or removed, or the tail cut off."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "magic"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete" and data:
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "magic" and len(data) > at + 4:      # values parsers trip on: huge, negative, zero
            value = draw(st.sampled_from([0, 1, -1, 2 ** 15 - 1, 2 ** 31 - 1, -(2 ** 31), 2 ** 16]))
            data[at:at + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(data)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@st.composite
def mutated_json(draw, seed):
    """The seed's structure with a few values replaced, keys removed, or lists shortened."""
    value = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 4))):
        path = []
        node = value
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append(key)
            node = node[key]
        if not path:
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return value


def _only_our_errors(name: str, load) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    try:
        load()
    except MeshNetLesionError:
        pass


# ------------------------------------------------------------------ seeds
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("seeds")
    data = (np.random.default_rng(0).random((6, 7, 5)) * 100).astype(np.float32)
    out: dict[str, object] = {}
    for name in ("s.nii", "s.nii.gz", "s.mgz"):
        image = nib.MGHImage(data, np.eye(4)) if name.endswith("mgz") else nib.Nifti1Image(data, np.eye(4))
        nib.save(image, str(folder / name))
        out[name] = (folder / name).read_bytes()
    for encoding in ("raw", "gzip"):
        nrrd.write(str(folder / f"{encoding}.nrrd"), data, {"space": "left-posterior-superior", "encoding": encoding,
                                                            "space directions": np.eye(3), "space origin": np.zeros(3)})
        out[f"{encoding}.nrrd"] = (folder / f"{encoding}.nrrd").read_bytes()
    # brainchop: a layers list and a PyTorch zip state dict of two convolutions
    out["brainchop.json"] = {"layers": [{"in_channels": -1, "out_channels": 4, "kernel_size": 3, "padding": 1,
                                         "dilation": 1}, {"in_channels": 4, "out_channels": -1, "kernel_size": 1,
                                                          "padding": 0, "dilation": 1}], "bnorm": True, "gelu": True}
    buffer = io.BytesIO()
    torch.save({"model.0.0.weight": torch.randn(4, 1, 3, 3, 3), "model.1.weight": torch.randn(2, 4, 1, 1, 1),
                "model.1.bias": torch.zeros(2)}, buffer)
    out["brainchop.pth"] = buffer.getvalue()
    # TensorFlow.js: one Conv3D with bias, one without
    out["tfjs.json"] = {"modelTopology": {"model_config": {"config": {"layers": [
        {"class_name": "InputLayer", "config": {}},
        {"class_name": "Conv3D", "config": {"name": "c1", "padding": "same", "dilation_rate": [2, 2, 2],
                                            "kernel_size": [3, 3, 3], "activation": "elu", "use_bias": True}},
        {"class_name": "Conv3D", "config": {"name": "c2", "padding": "same", "dilation_rate": [1, 1, 1],
                                            "kernel_size": [1, 1, 1], "activation": "linear", "use_bias": False}}]}}},
        "weightsManifest": [{"paths": ["w.bin"], "weights": [
            {"name": "c1/kernel", "shape": [3, 3, 3, 1, 3], "dtype": "float32"},
            {"name": "c1/bias", "shape": [3], "dtype": "float32"},
            {"name": "c2/kernel", "shape": [1, 1, 1, 3, 2], "dtype": "float32"}]}]}
    out["tfjs.bin"] = np.random.default_rng(1).random(81 + 3 + 6).astype("<f4").tobytes()
    # our safetensors file, and the replication's checkpoint layout
    build_meshnet(5).save(folder / "m.safetensors")
    out["meshnet.safetensors"] = (folder / "m.safetensors").read_bytes()
    state = {f"network.{k.replace('layers.', '').replace('.norm.', '.bn.')}": v
             for k, v in build_meshnet(5).state_dict().items()}
    state = {k.replace("network.9.conv.", "network.9."): v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save({"model_state_dict": state, "config": {"learning_rate": 0.001}}, buffer)
    out["final.pt"] = buffer.getvalue()
    out["folder"] = folder
    return out


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ scans
@pytest.mark.parametrize("name", ["s.nii", "s.nii.gz", "s.mgz", "raw.nrrd", "gzip.nrrd"])
def test_mutated_scans_load_or_are_refused_with_an_input_error(name, seeds, tmp_path):
    seed = seeds[name]
    assert load_volume(_write(tmp_path, name, seed)).shape == (6, 7, 5)      # the seed itself is fine

    @FUZZ
    @given(mutated_bytes(seed))
    def check(data):
        path = _write(tmp_path, name, data)
        _only_our_errors(name, lambda: load_volume(path))

    check()


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(["r.nii", "r.nii.gz", "r.nrrd", "r.mgz", "r.mgh"]))
def test_random_bytes_are_refused_as_scans(tmp_path_factory, data, name):
    path = _write(tmp_path_factory.mktemp("random"), name, data)
    _only_our_errors("random scan", lambda: load_volume(path))


# ------------------------------------------------------------------ model files
@pytest.mark.parametrize("kind, weights, weight_name", [("brainchop", "brainchop.pth", "model.pth"),
                                                       ("tfjs", "tfjs.bin", "w.bin")])
def test_mutated_brainchop_and_tfjs_model_json_are_refused_with_a_model_error(kind, weights, weight_name, seeds,
                                                                              tmp_path):
    seed = seeds[f"{kind}.json"]
    files = {"model.json": tmp_path / "model.json", weight_name: tmp_path / weight_name}
    _write(tmp_path, weight_name, seeds[weights])
    (tmp_path / "model.json").write_text(json.dumps(seed))
    load_model_files(files)                                                   # the seed itself loads

    @FUZZ
    @given(mutated_json(seed), mutated_bytes(seeds[weights]) | st.just(seeds[weights]))
    def check(config, weight_bytes):
        (tmp_path / "model.json").write_text(json.dumps(config))
        _write(tmp_path, weight_name, weight_bytes)
        _only_our_errors(f"{kind} model", lambda: load_model_files(files))

    check()


def test_mutated_safetensors_metadata_and_bytes_are_refused_with_a_model_error(seeds, tmp_path):
    from safetensors.numpy import load_file, save_file

    seed = seeds["meshnet.safetensors"]
    path = _write(tmp_path, "m.safetensors", seed)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        spec = json.loads(handle.metadata()[SPEC_METADATA_KEY])

    @FUZZ
    @given(mutated_json(spec))
    def metadata(changed):
        save_file(tensors, str(path), metadata={SPEC_METADATA_KEY: json.dumps(changed)})
        _only_our_errors("safetensors metadata", lambda: load_model_files({"m.safetensors": path}))

    @FUZZ
    @given(mutated_bytes(seed))
    def raw(data):
        _write(tmp_path, "m.safetensors", data)
        _only_our_errors("safetensors bytes", lambda: load_model_files({"m.safetensors": path}))

    metadata()
    raw()


def test_mutated_checkpoints_are_refused_and_never_run_pickled_code(seeds, tmp_path):
    seed = seeds["final.pt"]
    marker = tmp_path / "payload-ran"
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()
    assert load_model_files({"final.pt": _write(tmp_path, "final.pt", seed)}).num_parameters == 5_682
    members = zipfile.ZipFile(io.BytesIO(seed)).namelist()

    @FUZZ
    @given(st.sampled_from(members), st.booleans(), st.data())
    def check(member, splice, data):
        source = zipfile.ZipFile(io.BytesIO(seed))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as out:
            for name in members:
                content = source.read(name)
                if name == member:
                    content = payload if splice and name.endswith(".pkl") else data.draw(mutated_bytes(content))
                out.writestr(name, content)
        path = _write(tmp_path, "final.pt", buffer.getvalue())
        _only_our_errors("checkpoint", lambda: load_model_files({"final.pt": path}))
        assert not marker.exists()

    check()

    @FUZZ
    @given(mutated_bytes(seed))
    def whole(data):
        path = _write(tmp_path, "final.pt", data)
        _only_our_errors("checkpoint bytes", lambda: load_model_files({"final.pt": path}))
        assert not marker.exists()

    whole()


# ------------------------------------------------------------------ outputs: nothing but a regular file is replaced
HAZARDS = ("an input", "another input", "a FIFO", "a link to an input", "a link to another file", "a dangling link",
           "/dev/null", "a folder")
MODES = ("single -o", "single --report", "single --probabilities", "single --preview", "batch -o", "manifest",
         "bids", "report --tsv")


def _place_hazard(folder: Path, hazard: str, target: Path, inputs: list[Path]) -> Path:
    """Make ``target`` the hazard (or, where the hazard is a path of its own, return that path)."""
    if hazard == "an input":
        return inputs[0]
    if hazard == "another input":
        return inputs[-1]
    if hazard == "/dev/null":
        return Path("/dev/null")
    target.parent.mkdir(parents=True, exist_ok=True)
    if hazard == "a FIFO":
        os.mkfifo(target)
    elif hazard == "a link to an input":
        target.symlink_to(inputs[0])
    elif hazard == "a link to another file":
        (folder / "precious.txt").write_text("keep me")
        target.symlink_to(folder / "precious.txt")
    elif hazard == "a dangling link":
        target.symlink_to(folder / "nowhere")
    else:
        target.mkdir()
    return target


def _snapshot(folder: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(folder.rglob("*")):
        mode = os.lstat(path).st_mode
        found[str(path)] = (stat.S_IFMT(mode), path.read_bytes() if stat.S_ISREG(mode) else
                            os.readlink(path) if stat.S_ISLNK(mode) else None)
    return found


def _meaningful(mode: str, hazard: str) -> bool:
    """Replacing a regular file that is no input is what an output does; the report reads no scans; a batch's
    output names are its own (no /dev/null among them)."""
    return not ((mode.startswith("single") and hazard == "another input")
                or (mode == "report --tsv" and hazard in ("an input", "another input"))
                or (mode == "batch -o" and hazard == "/dev/null"))


@pytest.mark.parametrize("mode, hazard", [(m, h) for m in MODES for h in HAZARDS if _meaningful(m, h)])
def test_no_output_mode_replaces_an_input_or_anything_but_a_regular_file(tmp_path, mode, hazard):
    """Fault injection over every output mode of the command line and every hazard where an output goes (all of
    them: the space is small): refused with one line before anything runs, and every file and link as it was (the
    data-loss cases of the reliability issue). A new output mode belongs in MODES."""
    from meshnet_lesion import save_volume
    from meshnet_lesion.cli import main

    TRIED["output hazards"] = TRIED.get("output hazards", 0) + 1
    folder = tmp_path
    data = np.zeros((20, 22, 18), np.float32)
    data[4:16, 4:18, 4:14] = 300.0
    inputs = [save_volume(folder / name, data, np.eye(4)) for name in ("a.nii.gz", "b.nii.gz")]
    model = ["--model", "t2lesion-meshnet11", "--device", "cpu", "--no-brain-mask"]
    if mode.startswith("single"):
        flag = mode.split()[1]
        suffix = {"-o": ".nii.gz", "--report": ".json", "--probabilities": ".nii.gz", "--preview": ".png"}[flag]
        target = _place_hazard(folder, hazard, folder / f"out{suffix}", inputs)
        outputs = ["-o", target] if flag == "-o" else ["-o", folder / "x.nii.gz", flag, target]
        argv = ["segment", inputs[0], *outputs, *model]
    elif mode == "batch -o":
        results = folder / "results"
        results.mkdir()
        if hazard in ("an input", "another input"):   # the second scan lies where the first one's output goes
            os.replace(inputs[1], results / "a_seg.nii.gz")
            inputs[1] = results / "a_seg.nii.gz"
        else:
            _place_hazard(folder, hazard, results / "b_seg.nii.gz", inputs)
        argv = ["segment", *inputs, "-o", results, *model]
    elif mode == "manifest":
        target = _place_hazard(folder, hazard, folder / "b_out.json", inputs)   # row 2's sidecar (or an input)
        rows = [("a.nii.gz", "a_out.nii.gz"),
                ("b.nii.gz", target.name.replace(".json", ".nii.gz") if target.parent == folder else target)]
        if hazard in ("an input", "another input"):
            rows[1] = ("b.nii.gz", target.name)
        manifest = folder / "scans.csv"
        manifest.write_text("input,output\n" + "".join(f"{i},{o}\n" for i, o in rows))
        argv = ["segment", manifest, "-o", folder / "deriv", *model]
    elif mode == "bids":
        bids = folder / "bids"
        (bids / "sub-01" / "anat").mkdir(parents=True)
        os.replace(inputs[0], bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
        inputs[0] = bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
        mask = folder / "deriv" / "sub-01" / "anat" / "sub-01_desc-lesion_mask.nii.gz"
        if hazard in ("an input", "another input", "/dev/null"):
            mask.parent.mkdir(parents=True)
            mask.symlink_to(inputs[0])                              # the derivative is the raw scan
        else:
            _place_hazard(folder, hazard, mask, inputs)
        argv = ["segment", bids, "-o", folder / "deriv", *model]
    else:
        derivatives = folder / "deriv"
        derivatives.mkdir()
        (derivatives / "dataset_description.json").write_text("{}")
        target = _place_hazard(folder, hazard, folder / "table.tsv", inputs)
        argv = ["report", derivatives, "--tsv", target]
    before = _snapshot(folder)
    null_before = os.lstat("/dev/null").st_mode
    code = main([str(a) for a in argv])
    assert code == 2, (mode, hazard)
    assert _snapshot(folder) == before, (mode, hazard)
    assert os.lstat("/dev/null").st_mode == null_before
