"""Progress and cancellation, shared by the engine, the pipeline and the front ends.

A front end passes a :data:`ProgressCallback` (``fraction`` 0..1, stage text) and a
:class:`CancelToken` (a ``threading.Event`` will do); :class:`Progress` turns the reports of
several stages into one monotone progress and raises :class:`~.errors.Cancelled` when asked to.
"""
from __future__ import annotations

from typing import Callable, Protocol

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Progress:
    """One monotone 0..1 progress with stage text, forwarded to ``callback``, and the cancel check."""

    def __init__(self, callback: ProgressCallback | None = None, cancel: CancelToken | None = None) -> None:
        self.callback, self.cancel = callback, cancel
        self.fraction, self.stage = 0.0, ""

    def check(self) -> None:
        """Raise :class:`Cancelled` if the run was cancelled."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("segmentation was cancelled")

    def report(self, fraction: float, stage: str) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        self.stage = stage
        if self.callback is not None:
            self.callback(self.fraction, stage)

    def within(self, start: float, share: float, prefix: str = "") -> ProgressCallback:
        """The callback of a sub-stage whose 0..1 maps onto ``[start, start + share]``."""
        def report(fraction: float, stage: str) -> None:
            self.report(start + share * fraction, f"{prefix}: {stage}" if prefix else stage)
        return report
