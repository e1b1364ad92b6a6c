"""Child processes started through Slicer's ``PythonSlicer``, and stopping them for real.

Inside Slicer, ``PythonSlicer`` is CTK's AppLauncher renamed (commontk/AppLauncher,
``Base/ctkAppLauncher.cpp``): it starts ``python-real`` as its own child with forwarded stdin and
stdout, forwards no signal, and exits 1 when that child dies from a signal. Terminating the
process we started therefore stops only the launcher while the network runs on. So a child runs
in a process group of its own (POSIX) and the whole group is ended; the worker reports its own
process id, which Windows ends by id (with ``taskkill /T`` for the launcher's tree);
and the worker exits by itself when its stdin closes, which covers a parent that died.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

STOP_GRACE_S = 1.0   # after a polite stop, how long the processes get before they are killed


def pythonExecutable() -> str:
    """The Python a child runs in: as ``slicer.util._executePythonModule`` finds it (Slicer 5.8 to 5.12).

    In the application, ``PythonSlicer`` from the PATH; in a Python that ``PythonSlicer`` started
    (``python-real``), the launcher beside it; elsewhere (tests, a plain Python) this interpreter."""
    try:
        import slicer

        inApplication = hasattr(slicer, "app")
    except ImportError:
        inApplication = False
    if inApplication:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    beside = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return beside if os.path.isfile(beside) else sys.executable


def temporaryRoot() -> str | None:
    """Slicer's temporary folder (Application Settings) in the application, the system's elsewhere (None)."""
    try:
        import slicer

        return slicer.app.temporaryPath
    except (ImportError, AttributeError):
        return None


def start(command: list[str]) -> subprocess.Popen:
    """Start ``command`` in a process group of its own, stdin a pipe (the worker exits when it closes),
    stdout and stderr one text stream; no console window on Windows."""
    options: dict[str, Any] = {}
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0
        options = {"startupinfo": info, "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    else:
        options = {"start_new_session": True}
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", **options)


def stop(process: subprocess.Popen, workerPid: int | None = None) -> None:
    """End ``process``, everything it started and the worker: close its stdin, ask politely, and kill what is
    still there after :data:`STOP_GRACE_S` (on a thread of its own, so the caller does not wait)."""
    try:
        if process.stdin is not None:
            process.stdin.close()
    except OSError:
        pass
    _signal(process, workerPid, signal.SIGTERM)
    threading.Thread(target=_killLater, args=(process, workerPid), daemon=True).start()


def _killLater(process: subprocess.Popen, workerPid: int | None) -> None:
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    # the launcher may be gone while the worker (its child, in the same group) is not
    _signal(process, workerPid, getattr(signal, "SIGKILL", signal.SIGTERM))


def _signal(process: subprocess.Popen, workerPid: int | None, sig: int) -> None:
    if os.name == "nt":
        if process.poll() is None:  # the whole tree, /F: as TerminateProcess
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        if workerPid is not None:
            _kill(workerPid, signal.SIGTERM)
        return
    try:  # the launcher's group (start_new_session) holds the worker too: the launcher makes no group of its own
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass
