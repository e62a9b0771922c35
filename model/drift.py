"""Drift detection on an error stream (River's ADWIN by default), shared by the corrector and the
trainer's online monitor.

ADWIN readily fires while a model is still warming up, so detections before ``min_updates`` errors are
ignored; listeners get a :class:`DriftEvent`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftEvent:
    """A drift detection: which monitor, after how many updates, and the recent mean error."""

    name: str
    update: int
    count: int
    error_mean: float


class DriftMonitor:
    """A River drift detector on an error stream, ignoring detections during warm-up."""

    def __init__(self, detector=None, *, min_updates: int = 500, name: str = "corrector") -> None:
        if detector is None:
            from river import drift

            detector = drift.ADWIN(delta=0.002)
        self.detector = detector
        self.min_updates = int(min_updates)
        self.name = name
        self.updates = 0
        self.drift_count = 0
        self.drift_detected = False
        self.last_drift_at: int | None = None
        self._callbacks: list[Callable[[DriftEvent], None]] = []
        self._err_sum = 0.0
        self._err_n = 0

    def on_drift(self, callback: Callable[[DriftEvent], None]) -> None:
        self._callbacks.append(callback)

    def update(self, error: float) -> bool:
        self.updates += 1
        self._err_sum += error
        self._err_n += 1
        self.detector.update(float(error))
        fired = bool(self.detector.drift_detected) and self.updates >= self.min_updates
        self.drift_detected = fired
        if fired:
            self.drift_count += 1
            self.last_drift_at = self.updates
            event = DriftEvent(self.name, self.updates, self.drift_count, self._err_sum / max(self._err_n, 1))
            self._err_sum, self._err_n = 0.0, 0
            log.info("drift detected by %s after %d updates (#%d)", self.name, self.updates, self.drift_count)
            for cb in list(self._callbacks):
                try:
                    cb(event)
                except Exception:  # a failing listener must not break learning
                    log.exception("drift callback failed")
        return fired
