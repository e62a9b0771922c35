"""The outcome of one training run (either trainer: the scorer's LoRA adapter, the knowledge model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from driftrec.core.contracts import AdapterAnnouncement


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
