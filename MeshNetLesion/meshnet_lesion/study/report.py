"""A study's derivatives as one table (TSV) and one QC mosaic (the per-scan previews side by side)."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..outputs import atomic_file
from .cohort import PIPELINE_NAME, damaged_outputs

COLUMNS = ("participant", "session", "lesion_ml", "components", "hemisphere", "brain_ml", "model", "status",
           "seconds", "input", "output")
MOSAIC_COLUMNS = 6


def collect(derivatives: Path) -> list[dict[str, Any]]:
    """One row per scan: each mask's sidecar, and each failure record of ``logs/failed``."""
    derivatives = Path(derivatives)
    if not (derivatives / "dataset_description.json").is_file():
        raise InputError(f"{derivatives}: not a derivatives folder written by `meshnet-lesion segment` "
                           "(no dataset_description.json)")
    rows = []
    for sidecar in sorted(derivatives.glob("sub-*/**/anat/*_desc-lesion_mask.json")):
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        ours = record.get(PIPELINE_NAME, {})
        subject, session = _subject_session(sidecar.name)
        damaged = damaged_outputs(sidecar, ours)
        rows.append({"participant": subject, "session": session,
                     "lesion_ml": ours.get("lesion_volume_ml"), "components": ours.get("lesion_components"),
                     "hemisphere": ours.get("hemisphere"), "brain_ml": ours.get("brain_volume_ml"),
                     "model": ours.get("model"), "status": "damaged" if damaged else ours.get("status", "done"),
                     "error": f"changed since it was written: {', '.join(damaged)}" if damaged else "",
                     "seconds": ours.get("timings_s", {}).get("total"),
                     "input": (record.get("RawSources") or [""])[0],
                     "output": str(sidecar.with_name(sidecar.name[:-len(".json")] + ".nii.gz")
                                   .relative_to(derivatives)),
                     "preview": _preview_of(derivatives, sidecar)})
    for failure in sorted((derivatives / "logs" / "failed").glob("*.json")):
        record = json.loads(failure.read_text(encoding="utf-8"))
        rows.append({"participant": record.get("subject", ""), "session": record.get("session", ""),
                     "model": record.get("model"), "status": "failed", "input": record.get("input", ""),
                     "error": record.get("error", "")})
    return rows


def write_tsv(rows: list[dict[str, Any]], path: Path) -> Path:
    with atomic_file(Path(path)) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(["n/a" if row.get(column) is None else row.get(column, "n/a") for column in COLUMNS])
    return Path(path)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    done = [row for row in rows if row["status"] == "done"]
    failed = [row for row in rows if row["status"] == "failed"]
    damaged = [row for row in rows if row["status"] == "damaged"]
    lines = [f"{len(rows)} scan(s) from {len({row['participant'] for row in rows})} participant(s): "
             f"{len(done)} segmented, {len(failed)} failed" + (f", {len(damaged)} damaged" if damaged else "")]
    volumes = sorted(row["lesion_ml"] for row in done if row.get("lesion_ml") is not None)
    if volumes:
        quartiles = statistics.quantiles(volumes, n=4) if len(volumes) > 1 else [volumes[0]] * 3
        lines.append(f"lesion volume: median {quartiles[1]:.1f} mL (IQR {quartiles[0]:.1f}–{quartiles[2]:.1f}), "
                     f"range {volumes[0]:.1f}–{volumes[-1]:.1f} mL; {sum(v == 0 for v in volumes)} without lesion")
    sides = [row["hemisphere"] for row in done if row.get("hemisphere")]
    if sides:
        lines.append(f"largest lesion: {sides.count('left')} left, {sides.count('right')} right hemisphere")
    seconds = [row["seconds"] for row in done if row.get("seconds") is not None]
    if seconds:
        lines.append(f"time per scan: median {statistics.median(seconds):.1f} s")
    lines += [f"{row['status']}: {row['input']}: {row.get('error', '')}" for row in failed + damaged]
    return lines


def write_mosaic(rows: list[dict[str, Any]], derivatives: Path, path: Path) -> Path | None:
    """The per-scan previews in a grid, each titled with its scan and lesion volume (None: no previews)."""
    tiles = [row for row in rows if row.get("preview") and row["status"] == "done"]
    if not tiles:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(MOSAIC_COLUMNS, len(tiles))
    lines = -(-len(tiles) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines), facecolor="black",
                                squeeze=False)
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, row in zip(axes.ravel(), tiles):
        axis.imshow(plt.imread(derivatives / row["preview"]))
        session = f" ses-{row['session']}" if row["session"] else ""
        axis.set_title(f"sub-{row['participant']}{session}: {row['lesion_ml']:.1f} mL", color="white", fontsize=8)
    figure.tight_layout()
    try:
        with atomic_file(Path(path)) as partial:
            figure.savefig(partial, dpi=100, facecolor="black", format="png")
    finally:
        plt.close(figure)
    return Path(path)


def _preview_of(derivatives: Path, sidecar: Path) -> str | None:
    subject = sidecar.relative_to(derivatives).parts[0]
    preview = derivatives / subject / "figures" / (sidecar.name[:-len(".json")] + ".png")
    return str(preview.relative_to(derivatives)) if preview.is_file() else None


def _subject_session(name: str) -> tuple[str, str]:
    found = dict(part.split("-", 1) for part in name.split("_") if "-" in part)
    return found.get("sub", ""), found.get("ses", "")

