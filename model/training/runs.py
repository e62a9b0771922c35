"""The outcome of one training run (either trainer: the scorer's LoRA adapter, the knowledge model)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from driftrec.core import metrics
from driftrec.core.contracts import AdapterAnnouncement

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    outcome: str  # promoted | rejected | skipped | failed
    trigger: str = "manual"
    version: str | None = None
    serving_version: str | None = None
    decision: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    examples: int = 0
    holdout: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    gate_seconds: float = 0.0
    announcements: list[AdapterAnnouncement] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["announcements"] = [a.to_wire() for a in self.announcements]
        return d


def finish_run(runs: list, result: RunResult, t0: float, what: str) -> RunResult:
    """Either trainer's end of a run: its duration, the runs counter by outcome, the log line."""
    result.seconds = time.perf_counter() - t0
    metrics.TRAINER_RUNS.labels(outcome=result.outcome).inc()
    runs.append(result)
    log.info("%s (%s): %s version=%s examples=%d holdout=%d in %.1fs", what, result.trigger, result.outcome,
             result.version, result.examples, result.holdout, result.seconds)
    return result
