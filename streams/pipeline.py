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

**A stage that raises poisons nothing but the offending event.** A stage must leave no effect behind
when it raises (the features stage rolls its caches back to the states before the call) and be
idempotent by event id / source offset. So on an exception the pipeline retries the stage on the two
halves of what it was given, recursively (in order, so an entity's events keep their order), until
the failing events stand alone: those are rejected as ``processing`` with the stage's name and the
exception, everything else goes on normally, and every successful call's durability awaitables are
kept. When every event of a batch of several fails alone, the fault is not in the events (a broken
dependency): :class:`StageFailed` is raised and the worker stops (a supervisor restarts it and the
uncommitted records are replayed) rather than dead-letter valid events.
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


class StageFailed(RuntimeError):
    """A stage failed on every event of a batch on its own: not an event's fault."""


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

        An event rejected by one stage is not passed to the later ones; an event a stage raised on
        is isolated and rejected (see the module docstring).
        """
        result = StageResult()
        live = list(batch)
        for reg in self._stages:
            mine = [a for a in live if reg.types is None or a.event.TYPE in reg.types]
            if not mine:
                continue
            out = StageResult()
            await self._run_isolating(reg, mine, out)
            result.durable.extend(out.durable)
            if out.rejected:
                result.rejected.extend(out.rejected)
                gone = {id(a) for a, _ in out.rejected}
                live = [a for a in live if id(a) not in gone]
        return result

    async def _run_isolating(self, reg: _Registered, events: list[Accepted], out: StageResult) -> None:
        failed: list[Rejection] = []
        await self._bisect(reg, events, out, failed)
        if failed and len(failed) == len(events) > 1:
            raise StageFailed(f"pipeline stage {reg.name!r} failed on each of the {len(events)} events of a "
                              f"batch alone (last: {failed[-1][1].detail})")
        out.rejected.extend(failed)

    async def _bisect(self, reg: _Registered, events: list[Accepted], out: StageResult,
                      failed: list[Rejection]) -> None:
        try:
            res = await reg.stage(events)
        except Exception as exc:  # noqa: BLE001 - isolated below; a stage leaves nothing behind when it raises
            if len(events) == 1:
                acc = events[0]
                log.error("pipeline stage %r raised on event %s (%s[%d]@%d): %r", reg.name,
                          getattr(acc.event, "event_id", "?"), acc.topic, acc.partition, acc.offset, exc)
                failed.append((acc, Rejected("processing", f"stage {reg.name!r} raised {exc!r}"[:300])))
                return
            log.warning("pipeline stage %r raised on a batch of %d events (%r); isolating the event(s) at fault",
                        reg.name, len(events), exc)
            half = len(events) // 2
            await self._bisect(reg, events[:half], out, failed)
            await self._bisect(reg, events[half:], out, failed)
            return
        out.extend(res)
