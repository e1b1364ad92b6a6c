"""A whole study in one command: BIDS (or a CSV manifest) in, BIDS derivatives out; resumable and shardable.

The BIDS-App way (fMRIPrep's pattern): every scan is an independent, idempotent job. A scan whose
label map and sidecar already exist, and whose sidecar records the same input (SHA-256), model
(files' SHA-256) and options, is skipped; each scan's files are published together, the sidecar last,
so a killed run leaves no partial scan and resumes where it stopped. ``--shard i/N`` (or a Slurm job
array's ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``) takes every N-th scan of the sorted
list, so N processes together cover each scan exactly once, each loading the model once. Two runs
started on one study share it: each scan is locked while it runs (:func:`scan_lock`), and the
other run passes over it. The sidecar records each output's SHA-256, so a label map damaged after
it was written is not taken as current. Before anything runs, no output may be an input or another
output, nor stand where anything but a regular file is (:func:`check_outputs`).

Which scans, and where their outputs go, is :mod:`.scans`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import InputError, MeshNetLesionError, OutputError
from ..outputs import OutputSet, atomic_file, check_target, file_identity, process_alive, remove_leftovers
from ..registry import sha256_of
from .scans import Scan, stem

BIDS_VERSION = "1.9.0"
PIPELINE_NAME = "meshnet-lesion"
LOCK_STALE_S = 24 * 3600   # a lock another machine left is honoured this long (its process cannot be asked)














def check_outputs(scans: Sequence[Scan], probseg: bool) -> None:
    """Before anything runs: no output is any scan's input or another output (a manifest can say so, through a
    name, a symbolic or a hard link), and every output path can take a regular file (:func:`.outputs.check_target`).
    Raises :class:`InputError` naming the first conflict; nothing has been written then."""
    inputs = {file_identity(scan.source): index for index, scan in enumerate(scans, 1)}
    seen: dict[tuple, str] = {}
    for index, scan in enumerate(scans, 1):
        for role, path in (("label map", scan.mask), ("sidecar", scan.sidecar), ("preview", scan.preview),
                           *((("probability map", scan.probseg),) if probseg else ())):
            name = f"scan {index} ({scan.label}): its {role} {path}"
            key = file_identity(path)
            if key in inputs:
                raise InputError(f"{name} is the input of scan {inputs[key]}; nothing was run, nothing was written")
            if key in seen:
                raise InputError(f"{name} is also {seen[key]}; nothing was run, nothing was written")
            seen[key] = f"scan {index}'s {role}"
            check_target(path, f"scan {index} ({scan.label}): its {role}")


def dataset_description(output: Path, source: Path | None) -> None:
    """Write the derivative dataset's description (once; several shards may race, each write is atomic)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "dataset_description.json"
    if path.exists():
        return
    description = {
        "Name": "MeshNetLesion lesion masks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                         "Description": "Chronic stroke lesion masks from T2-weighted MRI with MeshNet",
                         "CodeURL": "https://github.com/neuroneural/MeshNetLesion"}],
    }
    if source is not None:
        description["SourceDatasets"] = [{"URL": Path(source).resolve().as_uri()}]
        description["DatasetLinks"] = {"raw": Path(source).resolve().as_uri()}
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    extras = {".bidsignore": "logs/\nsub-*/figures\nlesions.tsv\nlesions_mosaic.png\n",   # ours, not BIDS files
              "README.md": README}
    for name, text in extras.items():
        if not (output / name).exists():
            with atomic_file(output / name) as partial:
                partial.write_text(text, encoding="utf-8")


README = """# MeshNetLesion lesion masks

Chronic stroke lesion masks segmented from the T2-weighted images of the source dataset by
`meshnet-lesion segment` (MeshNet). Each `*_desc-lesion_mask.nii.gz` is on its source image's grid
(0 background, 1 lesion); its JSON sidecar records the model, its files' SHA-256, the input's SHA-256,
the options, volumes and timings. `sub-*/figures/` holds a preview per scan; `logs/failed/` the scans
that could not be segmented. Research software: not for clinical use.
"""


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    busy: int = 0               # being segmented by another run at the same time
    total: int = 0
    seconds: float = 0.0        # spent on the scans that ran

    @property
    def left(self) -> int:
        return self.total - self.done - self.skipped - self.failed - self.busy

    def eta(self) -> float | None:
        ran = self.done + self.failed
        return None if not ran else self.seconds / ran * self.left


class Cohort:
    """Runs a list of scans with one loaded :class:`~.pipeline.Segmenter`; see the module's docstring."""

    def __init__(self, segmenter, output: Path, options: dict[str, Any], *, probseg: bool = False,
                 overwrite: bool = False) -> None:
        self.segmenter = segmenter
        self.output = Path(output)
        self.options = options
        self.probseg = probseg
        self.overwrite = overwrite
        self.model = {"id": segmenter.entry.id, "version": str(segmenter.entry.card.get("version", "")),
                      "files_sha256": {f.name: f.sha256 for member in segmenter.registry.members(segmenter.entry)
                                       for f in member.files},
                      "inference": {"mirror": segmenter.mirror, "tile": segmenter.tile}}   # as it runs: card or options

    def signature(self, input_sha256: str) -> str:
        """What decides a scan's result: its input, the model's files and the options (not the machine)."""
        text = json.dumps({"input": input_sha256, "model": self.model, "options": self.options,
                           "probseg": self.probseg}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def is_current(self, scan: Scan, signature: str) -> bool:
        if self.overwrite or not scan.mask.exists() or (self.probseg and not scan.probseg.exists()):
            return False
        try:
            recorded = json.loads(scan.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        ours = recorded.get(PIPELINE_NAME, {})
        return ours.get("signature") == signature and not damaged_outputs(scan.sidecar, ours)

    def run(self, scans: Sequence[Scan], report: Callable[[str, Scan, Tally, dict], None] | None = None) -> Tally:
        """Segment each scan not already current; a failed scan is recorded (``logs/failed``) and the rest go on.
        Raises :class:`InputError` before anything runs if an output path is unusable (:func:`check_outputs`)."""
        check_outputs(scans, self.probseg)
        remove_leftovers({folder for scan in scans for folder in (scan.mask.parent, scan.preview.parent)})
        tally = Tally(total=len(scans))
        for scan in scans:
            started = time.perf_counter()
            with scan_lock(scan) as holder:
                if holder is not None:
                    tally.busy += 1
                    status, details = "busy", {"locked_by": holder}
                else:
                    status, details = self._one(scan, tally)
            if status in ("done", "failed"):
                tally.seconds += time.perf_counter() - started
            if report is not None:
                report(status, scan, tally, details)
        return tally

    def _one(self, scan: Scan, tally: Tally) -> tuple[str, dict[str, Any]]:
        from ..volume import load_volume

        try:
            digest = sha256_of(scan.source)
            signature = self.signature(digest)
            if self.is_current(scan, signature):
                tally.skipped += 1
                return "skipped", {}
            volume = load_volume(scan.source)
            result = self.segmenter.segment(volume, probabilities=self.probseg)
            details = self._write(scan, volume, result, signature, digest)
            self._forget_failure(scan)
            tally.done += 1
            return "done", details
        except (MeshNetLesionError, OSError) as error:
            message = str(error) if isinstance(error, MeshNetLesionError) else \
                f"{error.strerror or error}: {error.filename or scan.source}"
            self._record_failure(scan, message)
            tally.failed += 1
            return "failed", {"error": message}

    def _write(self, scan: Scan, volume, result, signature: str, input_sha256: str) -> dict[str, Any]:
        from ..preview import write_preview
        from ..volume import save_volume

        summary = result.summarize()
        largest = summary.get("largest_lesion") or {}
        ours = {
            "signature": signature,
            "status": "done",
            "model": self.model["id"], "model_version": self.model["version"],
            "model_files_sha256": self.model["files_sha256"],
            "input_sha256": input_sha256,
            "options": self.options,
            "lesion_volume_ml": summary["lesion_volume_ml"],
            "lesion_components": summary["lesion_components"],
            "hemisphere": largest.get("hemisphere"),
            "brain_volume_ml": summary["brain_volume_ml"],
            "device": result.device, "precision": result.precision, "brain_mask_precision": result.brain_precision,
            "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
            "warnings": result.warnings,
            "software": {**result.software, "python": sys.version.split()[0]},
            "created": result.created,
        }
        source = f"bids:raw:{scan.relative}" if scan.relative else str(scan.source)
        sidecar = {"Type": "Lesion", "Description": f"chronic stroke lesion segmented by {self.model['id']}",
                   "Sources": [source], "RawSources": [scan.relative or str(scan.source)],
                   "SpatialReference": source, PIPELINE_NAME: ours}
        title = f"{scan.subject or scan.source.name}: lesion {summary['lesion_volume_ml']:.1f} mL"
        with OutputSet() as outputs:
            for path in (scan.mask, scan.preview, scan.probseg):
                path.parent.mkdir(parents=True, exist_ok=True)
            written = {scan.mask: outputs.stage(scan.mask)}
            save_volume(written[scan.mask], result.labels, result.affine, label=True)
            if self.probseg:
                written[scan.probseg] = outputs.stage(scan.probseg)
                save_volume(written[scan.probseg], result.probabilities.astype("float32"), result.affine)
            if importlib.util.find_spec("matplotlib") is not None:   # the optional [preview] extra
                written[scan.preview] = outputs.stage(scan.preview)
                write_preview(written[scan.preview], volume.array, result.labels, result.affine, title)
            ours["outputs_sha256"] = {os.path.relpath(target, scan.sidecar.parent).replace(os.sep, "/"):
                                      sha256_of(partial) for target, partial in written.items()}
            outputs.stage(scan.sidecar).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            outputs.commit()                                 # the sidecar last: it marks the scan as done
        return ours

    def _failure_path(self, scan: Scan) -> Path:
        return self.output / "logs" / "failed" / (stem(scan.mask) + ".json")

    def _record_failure(self, scan: Scan, message: str) -> None:
        path = self._failure_path(scan)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"input": scan.label, "subject": scan.subject, "session": scan.session, "status": "failed",
                  "error": message, "model": self.model["id"], "software": {PIPELINE_NAME: __version__}}
        with atomic_file(path) as partial:
            partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def _forget_failure(self, scan: Scan) -> None:
        self._failure_path(scan).unlink(missing_ok=True)


def damaged_outputs(sidecar: Path, ours: dict[str, Any]) -> list[str]:
    """The outputs a sidecar lists whose SHA-256 is no longer the one they were written with (missing, truncated,
    edited), as paths relative to the sidecar's folder; a sidecar without the list (written before it existed)
    lists its label map as unverifiable."""
    recorded = ours.get("outputs_sha256")
    if not recorded:
        return [sidecar.name[: -len(".json")] + ".nii.gz (no SHA-256 recorded)"]
    damaged = []
    for relative, digest in recorded.items():
        try:
            if sha256_of(sidecar.parent / relative) != digest:
                damaged.append(relative)
        except OSError:
            damaged.append(relative)
    return damaged


@contextlib.contextmanager
def scan_lock(scan: Scan) -> Iterator[str | None]:
    """Hold ``scan`` for this process while the block runs: yields None, or, when a live run holds it already, who
    ("pid@host"). A lock whose process has ended is taken over; one from another machine is honoured for
    :data:`LOCK_STALE_S`."""
    scan.mask.parent.mkdir(parents=True, exist_ok=True)
    path = scan.mask.with_name(".lock-" + hashlib.sha1(scan.mask.name.encode()).hexdigest()[:16])
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is not None:
                yield holder
                return
            path.unlink(missing_ok=True)    # its process is gone
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as lock:
            lock.write(me)
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)
        return
    raise OutputError(f"{scan.label}: cannot take the lock {path}")


def _live_holder(path: Path) -> str | None:
    try:
        holder, age = path.read_text(encoding="utf-8").strip(), time.time() - path.stat().st_mtime
    except OSError:
        return None
    pid, _, host = holder.partition("@")
    if not pid.isdigit():   # created this instant, its holder not written yet
        return (holder or "another run") if age < 10 else None
    if host and host != socket.gethostname():
        return holder if age < LOCK_STALE_S else None
    return holder if process_alive(int(pid)) else None




def describe_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA unknown"
    minutes = int(seconds // 60)
    return f"ETA {minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"ETA {minutes}m{int(seconds % 60):02d}s"

