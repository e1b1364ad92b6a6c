"""What the command prints: the one error line, notes, progress (a bar on a terminal, stage lines elsewhere, a line
per scan of a study), download messages, and JSON files written atomically."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ..outputs import atomic_file

EXIT_BAD_INPUT = 2   # bad input, a failed scan, a refused path: what a caller checks for


def error(message: str) -> None:
    print(f"meshnet-lesion: error: {message}", file=sys.stderr)


def note(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"meshnet-lesion: {message}", file=sys.stderr)


def write_json(path: Path, data) -> Path:
    """JSON written as a partial file beside ``path``, then renamed (atomic, ordinary permissions)."""
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def progress_display(name: str, quiet: bool, interactive: bool):
    """A progress bar on a terminal, one line per stage elsewhere (logs, ``make``), nothing with ``-q``."""
    if quiet:
        yield None
    elif interactive:
        with ProgressBar(name) as bar:
            yield bar
    else:
        yield StageLines(name)


class StageLines:
    """Prints ``name: stage`` to stderr whenever the stage (the text before its first ':') changes."""

    def __init__(self, name: str) -> None:
        self.name, self.last = name, None

    def __call__(self, fraction: float, stage: str) -> None:
        head = stage.split(":")[0]
        if head != self.last:
            self.last = head
            print(f"{self.name}: {head} ({fraction:.0%})", file=sys.stderr, flush=True)


class ProgressBar:
    def __init__(self, name: str) -> None:
        self.name, self.bar = name, None

    def __enter__(self) -> ProgressBar:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=self.name, unit="", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                        "{elapsed}<{remaining} {postfix}", file=sys.stderr, leave=False)
        return self

    def __call__(self, fraction: float, stage: str) -> None:
        if self.bar is not None:
            self.bar.update(int(fraction * 1000) - self.bar.n)
            self.bar.set_postfix_str(stage, refresh=False)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def download_printer():
    def report(done: int, total: int, name: str) -> None:
        if total and done >= total:
            print(f"downloaded {name} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return report


class StudyProgress:
    """One line per scan: for people on a terminal (done / failed / left, ETA), else JSON for machines."""

    def __init__(self, interactive: bool, quiet: bool) -> None:
        self.interactive, self.quiet = interactive, quiet

    def __call__(self, status: str, scan, tally, details: dict) -> None:
        from ..study.cohort import describe_eta

        if self.interactive and not self.quiet:
            figure = (f": {details['lesion_volume_ml']:.1f} mL" if status == "done"
                      else f": {details['error']}" if status == "failed"
                      else f": being segmented by {details['locked_by']}" if status == "busy" else "")
            print(f"[{tally.done + tally.skipped + tally.failed + tally.busy}/{tally.total}] {status} {scan.label}"
                  f"{figure} · "
                  f"{tally.failed} failed, {tally.left} left, {describe_eta(tally.eta())}", file=sys.stderr,
                  flush=True)
        elif not self.interactive:
            record = {"status": status, "input": str(scan.source), "output": str(scan.mask),
                      "done": tally.done, "skipped": tally.skipped, "failed": tally.failed, "busy": tally.busy,
                      "left": tally.left}
            if "locked_by" in details:
                record["locked_by"] = details["locked_by"]
            if "lesion_volume_ml" in details:
                record["lesion_volume_ml"] = details["lesion_volume_ml"]
            if "error" in details:
                record["error"] = details["error"]
            print(json.dumps(record), flush=True)
