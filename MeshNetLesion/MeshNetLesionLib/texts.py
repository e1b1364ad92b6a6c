"""What the panel says, through Slicer's translation function: stage names, the model list, the result.

The core reports stages in English ("segmenting (model 2 of 3): layer 5 of 26"); :func:`stageText`
maps each known part onto a translatable phrase, so the status line follows Slicer's language.
"""
from __future__ import annotations

import re
from typing import Any

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (headless, no Qt) has no translation layer; the Lib's modules import this one
    def _(text: str) -> str:
        return text

_PATTERNS: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"segmenting \(model (\d+) of (\d+)\)"),
     lambda m: _("segmenting (model {index} of {count})").format(index=m[1], count=m[2])),
    (re.compile(r"layer (\d+) of (\d+)"), lambda m: _("layer {index} of {count}").format(index=m[1], count=m[2])),
    (re.compile(r"downloading (\S+)(?: \((\d+%)\))?"),
     lambda m: (_("downloading {name} ({percent})").format(name=m[1], percent=m[2]) if m[2]
                else _("downloading {name}").format(name=m[1]))),
]


def _fixed() -> dict[str, str]:
    return {"starting": _("starting"), "conforming to 256³ at 1 mm": _("conforming to 256³ at 1 mm"),
            "brain mask": _("brain mask"), "segmenting": _("segmenting"), "mirrored scan": _("mirrored scan"),
            "network done": _("network done"),
            "back to the source grid": _("back to the source grid"), "creating segments": _("creating segments"),
            "done": _("done")}


def stageText(stage: str) -> str:
    """The core's stage text ("part: part: …") in the panel's language; unknown parts stay as they are."""
    fixed = _fixed()
    parts = []
    for part in stage.split(": "):
        if part in fixed:
            parts.append(fixed[part])
            continue
        for pattern, translate in _PATTERNS:
            match = pattern.fullmatch(part)
            if match:
                parts.append(translate(match))
                break
        else:
            parts.append(part)
    return ": ".join(parts)


def statusText(stage: str, seconds: float) -> str:
    return _("{stage} — {seconds} s").format(stage=stageText(stage), seconds=f"{seconds:.0f}")


def modelLabel(entry, default: bool) -> str:
    """A model's line in the list: its title, (default), (imported)."""
    label = entry.title
    if default:
        label += " " + _("(default)")
    if entry.origin == "imported":
        label += " " + _("(imported)")
    return label


def modelToolTip(entry) -> str:
    """Task and evidence under the mouse: the card's task, description and first published metric."""
    card = entry.card
    lines = [_("Task: {task}").format(task=card.get("task", _("unknown")))]
    if card.get("description"):
        lines.append(str(card["description"]))
    metrics = card.get("metrics") or []
    if metrics:
        lines.append(_("Published: {name}: {value}").format(name=metrics[0]["name"], value=metrics[0]["value"]))
    elif card.get("task") == "lesion":
        lines.append(_("No published evaluation"))
    return "\n".join(lines)


def resultText(summary: dict[str, str]) -> str:
    """The panel's result line from what the run stored on the segmentation node."""
    if summary.get("LesionVolumeMl"):
        text = _("Lesion: {volume} mL in {components} component(s)").format(
            volume=f"{float(summary['LesionVolumeMl']):.2f}", components=summary.get("LesionComponents", ""))
        if summary.get("LargestLesionHemisphere"):
            side = {"left": _("left"), "right": _("right")}.get(summary["LargestLesionHemisphere"],
                                                              summary["LargestLesionHemisphere"])
            text += "; " + _("largest {volume} mL, {side} hemisphere").format(
                volume=f"{float(summary['LargestLesionMl']):.2f}", side=side)
        text += "."
    elif summary.get("Classes"):
        text = _("Segments: {classes}.").format(classes=summary["Classes"])
    else:
        return _("No result yet.")
    text += " " + _("Model {model} on {device}.").format(model=summary.get("Model", ""),
                                                         device=summary.get("Device", ""))
    if summary.get("BrainVolumeMl"):
        text += " " + _("Brain mask: {volume} mL.").format(volume=summary["BrainVolumeMl"])
    return text
