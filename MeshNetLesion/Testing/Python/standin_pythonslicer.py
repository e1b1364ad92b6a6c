"""A stand-in for Slicer's ``PythonSlicer``, for tests that must see the process tree Slicer makes.

The real one is CTK's AppLauncher renamed (commontk/AppLauncher ``Base/ctkAppLauncher.cpp``,
``runProcess`` and ``applicationFinished``): a Qt program that starts ``python-real`` as its own
child through QProcess with ``ForwardedChannels`` and ``ForwardedInputChannel`` (the child reads
and writes the launcher's stdin and stdout), installs no signal handler (SIGTERM or SIGINT end the
launcher and leave the child running: QProcess makes no process group of its own), exits with the
child's exit code, and when the child dies from a signal (``QProcess::CrashExit``) prints
"[…] exit abnormally - Report the problem." and exits 1. This file writes a launcher that does the
same around a given Python, named ``PythonSlicer`` as in Slicer's ``bin/``.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

_LAUNCHER = '''#!{python}
# Stand-in PythonSlicer (MeshNetLesion tests): see Testing/Python/standin_pythonslicer.py
import signal
import subprocess
import sys

signal.signal(signal.SIGINT, signal.SIG_DFL)   # a Qt program has no KeyboardInterrupt
REAL = {python!r}
child = subprocess.Popen([REAL, *sys.argv[1:]])   # stdin, stdout and stderr inherited
code = child.wait()
if code < 0:
    sys.stderr.write("[" + REAL + "] exit abnormally - Report the problem.\\n")
    sys.exit(1)
sys.exit(code)
'''


def install(folder: Path, python: str = sys.executable) -> Path:
    """Write ``folder/PythonSlicer`` (executable) that starts ``python`` as AppLauncher starts python-real."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "PythonSlicer"
    path.write_text(_LAUNCHER.format(python=python), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found
