"""The in-process pipeline behind the ingest agent.

The ingest agent validates raw events in batches; every accepted event is handed to the stages
registered here, in registration order (features before recommendations, so a request sees the
features its user's earlier events produced). A stage may reject events it cannot use (an unknown
item, say): those go to the dead-letter topic like malformed ones, so nothing is silently dropped.

A stage returns a :class:`StageResult`: its rejections, and the awaitables that make its outputs
for the batch durable (changelog records acknowledged, online-store rows written, messages sent).
The ingest agent acknowledges a batch's records - lets their offsets be committed - only once all
of them have completed (:mod:`driftrec.streams.batching`), so a stage never blocks the next batch on its
writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from driftrec.core.contracts import Event
from driftrec.core.validation import Rejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """A validated event and where it came from."""

    event: Event
    topic: str
    partition: int
    offset: int
    raw: bytes
    key: bytes | None = None


Rejection = tuple[Accepted, Rejected]


@dataclass
class StageResult:
    rejected: list[Rejection] = field(default_factory=list)
    durable: list[Awaitable] = field(default_factory=list)

    def extend(self, other: "StageResult | None") -> None:
        if other is not None:
            self.rejected.extend(other.rejected)
            self.durable.extend(other.durable)


Stage = Callable[[Sequence[Accepted]], Awaitable[StageResult | None]]


@dataclass
class _Registered:
    name: str
    stage: Stage
    types: frozenset[str] | None


class Pipeline:
    def __init__(self) -> None:
        self._stages: list[_Registered] = []

    def register(self, name: str, stage: Stage, *, types: Sequence[str] | None = None) -> None:
        """Add a stage; ``types`` limits it to those event types (``click``, ``rating`` …)."""
        if any(s.name == name for s in self._stages):
            raise ValueError(f"pipeline stage {name!r} registered twice")
        self._stages.append(_Registered(name, stage, frozenset(types) if types else None))

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self._stages]

    async def dispatch(self, batch: Sequence[Accepted]) -> StageResult:
        """Run every stage over the batch; collect rejections and durability awaitables.

        An event rejected by one stage is not passed to the later ones.
        """
        result = StageResult()
        live = list(batch)
        for reg in self._stages:
            mine = [a for a in live if reg.types is None or a.event.TYPE in reg.types]
            if not mine:
                continue
            out = await reg.stage(mine)
            if out is None:
                continue
            result.durable.extend(out.durable)
            if out.rejected:
                result.rejected.extend(out.rejected)
                gone = {id(a) for a, _ in out.rejected}
                live = [a for a in live if id(a) not in gone]
        return result
