"""Registry: cache → mirror → download (a real HTTP server on 127.0.0.1), hashes, import and remove."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import REPO

from meshnet_lesion import IntegrityError, ModelError, UnknownModelError
from meshnet_lesion.registry import BUILTIN_REGISTRY, Registry, sha256_of

REQUIRED_IDS = {"t2lesion-meshnet11", "brainchop-arc-meshnet11", "arc-meshnet26", "arc-meshnet26-r0", "arc-meshnet26-r1",
                "arc-meshnet26-r2", "brainchop-mindgrab", "brainchop-tissue-fast", "brainchop-subcortical",
                "sample-arc-m2265-t2w", "sample-t1-crop"}


@pytest.fixture
def http_folder(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1 and count the requests."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def _registry_file(tmp_path: Path, files: list[dict]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"schema_version": 1, "models": [
        {"id": "tiny", "title": "Tiny", "task": "tissue", "default": True, "files": files}]}))
    return path


def _tissue_files(folder: Path, base_url: str, shared_registry: Registry) -> list[dict]:
    records = []
    for name, path in shared_registry.fetch("brainchop-tissue-fast").items():
        shutil.copy(path, folder / name)
        records.append({"name": name, "sha256": sha256_of(path), "size": path.stat().st_size,
                        "url": f"{base_url}/{name}"})
    return records


def test_builtin_entries_and_cards(registry):
    ids = {entry.id for entry in registry.entries()}
    assert REQUIRED_IDS <= ids
    assert registry.default_model().id == "arc-meshnet26"
    default = registry.default_model().card
    assert default["metrics"] and default["measured"]          # published held-out Dice, and our suite's figures
    for entry in registry.entries("model"):
        for key in ("task", "license", "citation", "training_data", "metrics"):
            assert key in entry.card, (entry.id, key)
        assert "postprocess" in entry.runtime.as_record()
        assert bool(entry.runtime.spec) != bool(entry.runtime.members), entry.id   # an ensemble's spec is its members'
        for metric in entry.card["metrics"]:                  # published evaluations name where they were published
            assert metric["source"], (entry.id, metric)
        measured = entry.card.get("measured")
        if measured:                                          # our own figures: a line, and the result file they are in
            assert measured["summary"] and (REPO / measured["results"]).is_file(), (entry.id, measured)
            figures = json.loads((REPO / measured["results"]).read_text())["figures"]
            for figure in figures:                            # each names the command that measured it
                assert "lab/benchmarks/quality.py" in figure["source"], (entry.id, figure)
        assert registry.is_available(entry), entry.id
        for file in entry.files:
            if file.bundled is not None:       # shipped with the extension
                assert file.bundled.is_file() and sha256_of(file.bundled) == file.sha256, entry.id
            else:
                assert file.url.startswith("https://github.com/") and "/raw/" in file.url
            assert len(file.sha256) == 64


def test_bundled_file_is_hash_checked_and_must_stay_inside_the_package(tmp_path, registry):
    source = next(iter(registry.fetch("brainchop-tissue-fast").values()))
    (tmp_path / "weights").mkdir()
    shipped = tmp_path / "weights" / source.name
    shutil.copy(source, shipped)
    record = {"name": source.name, "sha256": sha256_of(source), "size": source.stat().st_size,
              "bundled": f"weights/{source.name}"}
    local = Registry(_registry_file(tmp_path, [record]), cache_dir=tmp_path / "cache", mirror="")
    entry = local.get("tiny")
    assert local.locate(entry, entry.files[0]) == shipped and local.is_available("tiny")
    shipped.write_bytes(shipped.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="reinstall"):
        local.locate(entry, entry.files[0])
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(ModelError, match="inside the package"):
        Registry(_registry_file(outside, [{**record, "bundled": "../weights/x"}]), cache_dir=tmp_path / "cache")


def test_mirror_files_are_found_by_name_and_hash(registry):
    paths = registry.fetch("brainchop-mindgrab")
    assert set(paths) == {"model.json", "model.pth"}
    for name, path in paths.items():
        assert path.is_file()
        assert sha256_of(path) == next(f.sha256 for f in registry.get("brainchop-mindgrab").files if f.name == name)


def test_unknown_id_lists_known_ones(registry):
    with pytest.raises(UnknownModelError, match="t2lesion-meshnet11"):
        registry.get("no-such-model")


def test_download_verifies_caches_and_is_atomic(tmp_path, http_folder, registry):
    folder, base_url, requests = http_folder
    files = _tissue_files(folder, base_url, registry)
    local = Registry(_registry_file(tmp_path, files), cache_dir=tmp_path / "cache", mirror="")
    assert not local.is_available("tiny")
    progress = []
    paths = local.fetch("tiny", progress=lambda done, total, name: progress.append((done, total, name)))
    assert all(path.parent == tmp_path / "cache" / "files" / "tiny" for path in paths.values())
    assert len(requests) == 2 and progress and progress[-1][0] == progress[-1][1]
    assert local.load("tiny").spec.num_classes == 3
    # second time: served from the verified cache, no request
    local.fetch("tiny")
    assert len(requests) == 2
    # a damaged cache file is reported, never deleted by looking (a panel refresh), and replaced by a fetch
    damaged = paths["model.pth"]
    damaged.write_bytes(b"garbage")
    assert not local.is_available("tiny") and local.damaged_files("tiny") == ["model.pth"]
    assert damaged.read_bytes() == b"garbage"
    local.fetch("tiny")
    assert local.damaged_files("tiny") == []
    assert sha256_of(damaged) == next(f["sha256"] for f in files if f["name"] == "model.pth")
    assert len(requests) == 3


def test_wrong_hash_download_leaves_nothing(tmp_path, http_folder, registry):
    folder, base_url, _ = http_folder
    files = _tissue_files(folder, base_url, registry)
    files[1]["sha256"] = "0" * 64
    local = Registry(_registry_file(tmp_path, files), cache_dir=tmp_path / "cache", mirror="")
    with pytest.raises(IntegrityError, match="SHA-256"):
        local.fetch("tiny")
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == ["model.json"]  # only the file that verified


def test_mirror_ignores_a_file_with_the_right_name_but_wrong_hash(tmp_path, http_folder, registry):
    folder, base_url, requests = http_folder
    files = _tissue_files(folder, base_url, registry)
    mirror = tmp_path / "mirror" / "nested"
    mirror.mkdir(parents=True)
    (mirror / "model.pth").write_bytes(b"not the model")
    shutil.copy(folder / "model.json", mirror / "model.json")
    local = Registry(_registry_file(tmp_path, files), cache_dir=tmp_path / "cache", mirror=tmp_path / "mirror")
    paths = local.fetch("tiny")
    assert paths["model.json"] == mirror / "model.json"
    assert paths["model.pth"].parent == tmp_path / "cache" / "files" / "tiny"
    assert requests == ["/model.pth"]


def test_unreachable_download_is_a_clear_error(tmp_path, registry):
    files = [{"name": "model.json", "sha256": "1" * 64, "url": "http://127.0.0.1:9/model.json"}]
    local = Registry(_registry_file(tmp_path, files), cache_dir=tmp_path / "cache", mirror="")
    with pytest.raises(ModelError, match="model.json is not on this machine and could not be downloaded"):
        local.fetch("tiny")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_import_list_and_remove(tmp_path, registry):
    source = tmp_path / "my model"
    source.mkdir()
    for name, path in registry.fetch("t2lesion-meshnet11").items():
        shutil.copy(path, source / name)
    local = Registry(cache_dir=tmp_path / "cache", mirror=registry.mirror)
    entry = local.import_folder(source, title="My lesion model")
    assert entry.id == "my-model" and entry.origin == "imported" and entry.task == "lesion"
    assert "my-model" in {e.id for e in local.entries("model")}
    assert local.load("my-model").spec.num_classes == 2
    with pytest.raises(ModelError, match="already imported"):
        local.import_folder(source, title="again")
    with pytest.raises(ModelError, match="built-in"):
        local.import_folder(source, entry_id="t2lesion-meshnet11")
    # a file changed after import is not trusted
    (tmp_path / "cache" / "imported" / "my-model" / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(IntegrityError):
        local.fetch("my-model")
    local.remove("my-model")
    assert "my-model" not in {e.id for e in local.entries()}


def test_import_refuses_a_broken_folder(tmp_path, registry):
    source = tmp_path / "broken"
    source.mkdir()
    (source / "model.json").write_text("{not json")
    local = Registry(cache_dir=tmp_path / "cache", mirror=registry.mirror)
    with pytest.raises(ModelError):
        local.import_folder(source)
    assert not (tmp_path / "cache" / "imported" / "broken").exists()


def test_clear_cache_keeps_imports(tmp_path, http_folder, registry):
    folder, base_url, _ = http_folder
    local = Registry(_registry_file(tmp_path, _tissue_files(folder, base_url, registry)),
                     cache_dir=tmp_path / "cache", mirror="")
    local.fetch("tiny")
    local.clear_cache()
    assert not (tmp_path / "cache" / "files").exists()


def test_registry_file_is_versioned():
    data = json.loads(BUILTIN_REGISTRY.read_text())
    assert data["schema_version"] == 1 and data["registry_version"]


def test_models_json_follows_its_schema_and_the_schema_refuses_what_the_registry_cannot_run():
    import copy

    import jsonschema

    schema = json.loads((BUILTIN_REGISTRY.parent / "models.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(BUILTIN_REGISTRY.read_text())
    jsonschema.validate(data, schema)
    for damage in (lambda d: d["models"][0]["files"][0].update(sha256="0" * 63),         # not a SHA-256
                   lambda d: d["models"][0].setdefault("inference", {}).update(tile=8),  # too small a tile
                   lambda d: d["models"][0].update(measured=[{"name": "x", "value": "1", "source": "s"}]),  # old form
                   lambda d: d["models"][0].pop("license")):
        damaged = copy.deepcopy(data)
        damage(damaged)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(damaged, schema)
