"""The run's child process as Slicer starts it: through a ``PythonSlicer`` that forwards no signal.

Every job here starts its child through the stand-in launcher (:mod:`standin_pythonslicer`), which
behaves as CTK's AppLauncher does; before the launcher module, Cancel terminated only the launcher
and the network ran on. Linux only (process ids and states from /proc).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import standin_pythonslicer as standin
from conftest import REPO

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package")
from headless_slicer import App  # noqa: E402

from MeshNetLesionLib.job import Launch  # noqa: E402
from MeshNetLesionLib.logic import MeshNetLesionLogic  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
FAST = {"modelId": "meshnet5-arc26", "brainMask": False, "device": "cpu"}
MODULE_DIR = REPO / "MeshNetLesion"


@pytest.fixture(scope="module")
def launcher_path(tmp_path_factory):
    return standin.install(tmp_path_factory.mktemp("slicer-bin"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return App(tmp_path_factory.mktemp("terminology-share"))


class ThroughLauncher(MeshNetLesionLogic):
    """The logic as it runs in Slicer: children through PythonSlicer, requests in Slicer's temporary folder."""

    def __init__(self, scene, registry, python: Path, temporary: Path) -> None:
        super().__init__(scene, registry)
        self.python, self.temporary = str(python), temporary

    def launch(self) -> Launch:
        return Launch(self.python, self.registry.settings(), str(self.temporary))


@pytest.fixture
def logic(app, registry, launcher_path, tmp_path):
    temporary = tmp_path / "slicer-temp"
    temporary.mkdir()
    return ThroughLauncher(app.scene, registry, launcher_path, temporary)


@pytest.fixture(scope="module")
def scan_node(app, arc_volume):
    return app.add_volume("M2265", arc_volume.array, arc_volume.affine)


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _poll_until_layers(job) -> None:
    _until(lambda: job.poll() or "layer" in job.stage, 300, "the network's first layer")
    assert not job.finished, job.error


def test_standin_launcher_behaves_like_ctk_applauncher(launcher_path):
    """What the job has to cope with: terminating the launcher leaves python-real running; a signal that ends
    python-real makes the launcher exit 1 with AppLauncher's message."""
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(float(sys.argv[1]))"
    launcher = subprocess.Popen([str(launcher_path), "-c", code, "60"], stdout=subprocess.PIPE, text=True)
    real = int(launcher.stdout.readline())
    assert real != launcher.pid and standin.children(launcher.pid) == [real]
    launcher.terminate()
    assert launcher.wait(timeout=5) == -signal.SIGTERM
    time.sleep(0.2)
    assert standin.alive(real), "python-real should outlive a terminated launcher, as under CTK's AppLauncher"
    os.kill(real, signal.SIGKILL)
    _until(lambda: not standin.alive(real), 5, "python-real to end")
    launcher = subprocess.Popen([str(launcher_path), "-c", code, "60"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    os.kill(int(launcher.stdout.readline()), signal.SIGKILL)   # as the out-of-memory killer would
    assert launcher.wait(timeout=5) == 1
    assert "exit abnormally" in launcher.stderr.read()


def test_cancel_through_the_launcher_ends_the_network_within_2_s_and_leaves_nothing(app, logic, scan_node):
    before = app.node_ids()
    job = logic.segmentAsync(scan_node, **FAST)
    _poll_until_layers(job)
    launcher_pid, worker_pid = job._process.pid, job._workerPid
    assert worker_pid is not None and worker_pid != launcher_pid and standin.alive(worker_pid)
    assert list(logic.temporary.iterdir()), "the request is written to Slicer's temporary folder"
    cancelled = time.monotonic()
    job.cancel()
    job.wait(timeout=30)
    elapsed = time.monotonic() - cancelled
    assert job.state == "cancelled" and elapsed <= 2.0, (job.state, elapsed)
    _until(lambda: not standin.alive(worker_pid), 2.0, "the worker to be gone")
    assert not standin.alive(launcher_pid)
    assert not job._thread.is_alive()
    assert list(logic.temporary.iterdir()) == []
    assert app.node_ids() == before


def test_an_out_of_memory_kill_of_the_worker_is_reported_as_such(app, logic, scan_node):
    job = logic.segmentAsync(scan_node, **FAST)
    _poll_until_layers(job)
    os.kill(job._workerPid, signal.SIGKILL)   # the kernel's out-of-memory killer ends python-real, not the launcher
    job.wait(timeout=30)
    assert job.state == "failed"
    message = str(job.error)
    assert "exit code 1" in message and "ran out of memory" in message, message
    assert "exit abnormally" in job.errorDetail   # the launcher's own line, for the details
    assert list(logic.temporary.iterdir()) == []


def test_the_worker_ends_when_its_parent_dies(tmp_path, launcher_path, registry, arc_volume):
    """Slicer killed or crashed mid-run: the pipe to the worker's stdin closes and the worker exits by itself."""
    from meshnet_lesion import worker
    from meshnet_lesion.request import SegmentationRequest

    request = tmp_path / "request"
    request.mkdir()
    wanted = SegmentationRequest(FAST["modelId"], device="cpu", brain_mask=False)
    worker.write_request(request, arc_volume, {"request": wanted.to_json(), "registry": registry.settings()})
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from MeshNetLesionLib import launcher
        from meshnet_lesion import worker
        child = launcher.start(worker.command({str(launcher_path)!r}, worker.Path({str(request)!r}),
                                              {str(MODULE_DIR)!r}))
        for line in child.stdout:
            message = worker.parse_line(line)
            if message and message[0] == "progress" and "layer" in message[1][1]:
                break
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    parent_process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    launcher_pid = int(parent_process.stdout.readline())
    (worker_pid,) = standin.children(launcher_pid)
    parent_process.kill()   # as a crash of Slicer: no cancel, no clean-up
    parent_process.wait()
    _until(lambda: not standin.alive(worker_pid), 10, "the orphaned worker to exit")
    assert not (request / "labels.npy").exists()


def test_import_model_folder_runs_in_a_child_without_torch_in_slicers_process(shared, tmp_path, launcher_path):
    """'Import model folder…' loads the model to check it: in a child, so Slicer's process never imports torch."""
    code = textwrap.dedent(f"""
        import sys
        from meshnet_lesion.registry import Registry
        from MeshNetLesionLib.job import Launch
        from MeshNetLesionLib.logic import MeshNetLesionLogic

        class Logic(MeshNetLesionLogic):
            def launch(self):
                return Launch({str(launcher_path)!r}, self.registry.settings())

        registry = Registry(cache_dir={str(tmp_path / "cache")!r})
        entry = Logic(registry=registry).importModelFolder({str(shared / "models" / "t2lesion-meshnet11")!r},
                                                         "my-t2lesion")
        assert entry.id == "my-t2lesion" and entry.origin == "imported", entry
        assert "torch" not in sys.modules, "torch was imported into the parent"
        print("imported", entry.id)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MODULE_DIR)
    assert done.returncode == 0, done.stderr
    assert "imported my-t2lesion" in done.stdout
    # a folder that is not a model: the child's error comes back as our own error class, one sentence
    from meshnet_lesion.errors import MeshNetLesionError
    from meshnet_lesion.registry import Registry

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    logic = MeshNetLesionLogic(registry=Registry(cache_dir=tmp_path / "cache2"))
    with pytest.raises(MeshNetLesionError):
        logic.importModelFolder(empty)


def test_the_child_reports_the_devices_it_found_for_the_panel(logic, scan_node):
    job = logic.segmentAsync(scan_node, **FAST)
    _until(lambda: job.poll() or job.devices is not None, 300, "the devices message")
    job.cancel()
    job.wait(timeout=30)
    assert job.devices["cpu"] is None and set(job.devices) == {"cpu", "cuda", "mps"}


def test_a_short_action_runs_in_a_child_and_cleans_up(tmp_path):
    """The devices query: a request folder in the given temporary folder, removed afterwards."""
    from MeshNetLesionLib.job import runAction

    found = runAction(Launch(sys.executable, {}, str(tmp_path)), {"action": "devices"})
    assert found["devices"]["cpu"] is None
    assert list(tmp_path.iterdir()) == []   # the request folder is gone
