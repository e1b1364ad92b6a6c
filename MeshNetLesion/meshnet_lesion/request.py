"""One segmentation request, typed, from a front end to the :class:`~.pipeline.Segmenter`: the Slicer panel builds
it, the worker receives it as JSON (``request.json``), the Segmenter is made from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class SegmentationRequest:
    """What one run is asked for. ``None`` leaves a choice to the model's registry entry (its default model, brain
    mask, standardisation, mirrored pass); ``crop_margin`` "auto" is the entry's or the pipeline's margin."""

    model_id: str | None = None
    device: str = "auto"
    precision: str = "auto"
    brain_mask: bool | None = None
    standardize: bool | None = None
    mirror: bool | None = None
    min_lesion_ml: float = 0.0
    crop_margin: int | str | None = "auto"
    probabilities: bool = False            # also return the probability map(s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentationRequest:
        """From :meth:`to_json`'s form; a key this version does not know is refused, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"the segmentation request has unknown fields {sorted(unknown)}")
        return cls(**data)

    def segmenter_options(self) -> dict[str, Any]:
        """The :class:`~.pipeline.Segmenter`'s keyword arguments (all but the model and ``probabilities``)."""
        options = self.to_json()
        del options["model_id"], options["probabilities"]
        return options
