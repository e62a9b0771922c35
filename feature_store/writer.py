"""The feature-writer seam: how the streaming features stage gets rows into the online store.

:class:`FeatureWriter` takes one batch of *entity rows* (one row per user / item, already merged
over the batch; ``last_event_time`` is the row's event time) and writes them to the online store
as a unit. Backends (:mod:`driftrec.feature_store.backends`, one module each, Feast's style) provide
a blocking row store; :func:`driftrec.feature_store.process.create_writer` runs it in the worker's
writer process (:mod:`driftrec.feature_store.process`, which says why a process). Rows are encoded by
:mod:`driftrec.feature_store.codec`.

After a write returns, the rows are readable; that is when freshness (now - event time, per
entity row) is observed.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from driftrec.core import metrics
from driftrec.core.settings import Settings
from driftrec.feature_store.codec import ITEM_CODEC, USER_CODEC, Row
from driftrec.feature_store.definitions import ITEM_VIEW, USER_VIEW

log = logging.getLogger(__name__)

__all__ = ["FeatureWriter", "Row", "WriteFailed", "WriteResult", "WRITE_FAILURE_REASONS"]

# why a write failed: the ``reason`` label of ``driftrec_feature_write_failures_total`` (a fixed set)
WRITE_FAILURE_REASONS = ("timeout", "writer_exited", "writer_start", "store_error", "other")


class WriteFailed(RuntimeError):
    """A write that did not land, with one of :data:`WRITE_FAILURE_REASONS`; the row sink retries it."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in WRITE_FAILURE_REASONS:
            raise ValueError(f"unknown write failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass
class WriteResult:
    user_rows: int
    item_rows: int
    seconds: float
    newest_event_time: float | None


# --- the seam --------------------------------------------------------------------------------------


class FeatureWriter(abc.ABC):
    """Writes batches of user and item feature rows to one online store."""

    store_name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codecs = (USER_CODEC, ITEM_CODEC)
        self._fresh = (metrics.FEATURE_FRESHNESS_SECONDS.labels(store=self.store_name, feature_view=USER_VIEW),
                       metrics.FEATURE_FRESHNESS_SECONDS.labels(store=self.store_name, feature_view=ITEM_VIEW))
        self._lag = metrics.FEATURE_NEWEST_EVENT_LAG_SECONDS.labels(store=self.store_name)
        self._rows_user = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=USER_VIEW)
        self._rows_item = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=ITEM_VIEW)
        self._write_seconds = metrics.FEATURE_WRITE_SECONDS.labels(store=self.store_name)
        self.newest_event_time: float | None = None
        self.started = False
        self._start_lock: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None

    # -- lifecycle
    async def start(self) -> None:
        """Open the store (apply the definitions) - idempotent."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self.started:
                await self._start()
                self.started = True

    async def close(self) -> None:
        if self.started:
            await self._close()
            self.started = False

    async def __aenter__(self) -> "FeatureWriter":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the seam
    async def write_batch(self, user_rows: Sequence[Row], item_rows: Sequence[Row], *,
                          user_times: Sequence[float] | None = None,
                          item_times: Sequence[float] | None = None) -> WriteResult:
        """Write one batch (at most one row per entity); returns when the rows are readable.

        Batches are written one at a time, in the order they were submitted. Freshness
        (``driftrec_feature_freshness_seconds``) is observed once per event: for each of ``user_times`` /
        ``item_times`` (the event times of the interactions whose updates the rows carry: a row that
        coalesces ten events counts ten, each from its own event time); where they are not given, once per
        row from its ``last_event_time`` (the row's newest event).
        """
        if not (user_rows or item_rows):
            return WriteResult(0, 0, 0.0, None)
        await self.start()
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            t0 = time.perf_counter()
            await self._write(user_rows, item_rows)
            elapsed = time.perf_counter() - t0
        now = time.time()
        newest = None
        for rows, times, fresh in zip((user_rows, item_rows), (user_times, item_times), self._fresh):
            observe = fresh.observe
            row_times = [float(row["last_event_time"]) for row in rows]
            for t in (row_times if times is None else times):
                observe(max(now - t, 0.0))
            if row_times:
                t = max(row_times)
                if newest is None or t > newest:
                    newest = t
        if newest is not None and (self.newest_event_time is None or newest > self.newest_event_time):
            self.newest_event_time = newest
        if self.newest_event_time is not None:
            self._lag.set(max(now - self.newest_event_time, 0.0))
        self._write_seconds.observe(elapsed)
        self._rows_user.inc(len(user_rows))
        self._rows_item.inc(len(item_rows))
        return WriteResult(len(user_rows), len(item_rows), elapsed, newest)

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        """Write the rows of both views; return once they are readable."""

    async def _close(self) -> None:  # pragma: no cover - default: nothing to release
        return None
