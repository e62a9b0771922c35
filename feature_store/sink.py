"""The row sink: batches of feature rows in, coalesced ordered writes to the online store out.

The features stage hands the sink the rows of every batch it processes (one row per touched
entity). The sink keeps one write in flight; rows that arrive meanwhile wait and are merged per
entity (the newest row wins - a row is a function of the entity's state, so older ones are
superseded), and go out together in the next write. Under load the writes grow and the cost per
event falls; at a trickle every batch is written as it comes, so freshness stays the write time.

Each :meth:`RowSink.submit` returns a future that is done once the rows it carried (or newer
ones for the same entities) are readable; the stage's batch is acknowledged only after that. A
failed write (the store refused it, the writer process died, or did not answer within
``feast.write_timeout_s`` and was killed - :mod:`driftrec.feature_store.process`) is retried with
back-off (:data:`RETRY_PAUSES_S`), ``feast.write_retries`` times; every failed attempt counts in
``driftrec_feature_write_failures_total{store,reason}``. While it retries, the rows are kept and the
stage's acknowledgements - and so its offset commits - wait. When the retries are spent the sink
fails: the futures of everything pending (and of everything submitted later) fail, and
``on_failure`` is called - the features stage passes the app's ``crash_soon``, so the worker stops
with an error, its supervisor restarts it, and the uncommitted events are replayed (rows are
re-derived from the state; nothing is lost or counted twice).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence

from driftrec.core import metrics
from driftrec.feature_store.codec import Row
from driftrec.feature_store.writer import WRITE_FAILURE_REASONS, FeatureWriter

log = logging.getLogger(__name__)

RETRY_PAUSES_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class RowSinkFailed(RuntimeError):
    """The online store could not be written within the retries: the worker must stop."""


class RowSink:
    def __init__(self, writer: FeatureWriter, *, user_key: str = "user_id", item_key: str = "item_id",
                 retries: int | None = None, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """``retries``: default ``feast.write_retries``; ``on_failure(exc)`` is called once when they are spent."""
        self.writer = writer
        self._user_key, self._item_key = user_key, item_key
        self._users: dict[str, Row] = {}
        self._items: dict[str, Row] = {}
        self._user_times: list[float] | None = []  # event times the pending rows carry (None: not given)
        self._item_times: list[float] | None = []
        self._waiters: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None
        self.retries = writer.settings.feast.write_retries if retries is None else retries
        self.on_failure = on_failure
        self.failed: BaseException | None = None
        self._failures = {r: metrics.FEATURE_WRITE_FAILURES.labels(store=writer.store_name, reason=r)
                          for r in WRITE_FAILURE_REASONS}

    def submit(self, user_rows: Sequence[Row], item_rows: Sequence[Row], *, user_times: Sequence[float] | None = None,
               item_times: Sequence[float] | None = None) -> asyncio.Future:
        """Queue rows; the future is done when they are in the online store. ``user_times`` /
        ``item_times``: the event times of the interactions whose updates the rows carry, so freshness is
        measured per event (:meth:`FeatureWriter.write_batch`); without them, per row."""
        fut = asyncio.get_running_loop().create_future()
        if self.failed is not None:  # the worker is stopping; nothing more is written or acknowledged
            fut.set_exception(RowSinkFailed("the row sink failed earlier"))
            fut.exception()  # the batch's acker reports it
            return fut
        if not (user_rows or item_rows):
            fut.set_result(None)
            return fut
        uk, ik = self._user_key, self._item_key
        for r in user_rows:
            self._users[r[uk]] = r
        for r in item_rows:
            self._items[r[ik]] = r
        self._user_times = _extend(self._user_times, user_times, user_rows)
        self._item_times = _extend(self._item_times, item_times, item_rows)
        self._waiters.append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return fut

    @property
    def pending(self) -> int:
        return len(self._users) + len(self._items)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._waiters:
            users, items, waiters = list(self._users.values()), list(self._items.values()), self._waiters
            times = (self._user_times, self._item_times)
            self._users, self._items, self._waiters = {}, {}, []
            self._user_times, self._item_times = [], []
            try:
                await self._write(users, items, times)
            except RowSinkFailed as exc:  # retries spent: fail everything pending, stop the worker
                self.failed = exc
                waiters += self._waiters
                self._users, self._items, self._waiters = {}, {}, []
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                        w.exception()
                log.critical("%s", exc)
                if self.on_failure is not None:
                    self.on_failure(exc)
                return
            except BaseException as exc:  # cancelled (shutting down): the waiters learn it
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc if isinstance(exc, Exception) else RuntimeError("row sink stopped"))
                raise
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _write(self, users: list[Row], items: list[Row], times=(None, None)) -> None:
        attempt = 0
        while True:
            try:
                await self.writer.write_batch(users, items, user_times=times[0], item_times=times[1])
                if attempt:
                    log.warning("online-store write of %d+%d rows succeeded after %d failed attempt(s)",
                                len(users), len(items), attempt)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store or the writer process is away: keep the rows
                reason = getattr(exc, "reason", "other")
                self._failures.get(reason, self._failures["other"]).inc()
                if attempt >= self.retries:
                    raise RowSinkFailed(f"online-store write of {len(users)}+{len(items)} rows failed "
                                        f"{attempt + 1} times (feast.write_retries={self.retries}), last: "
                                        f"{exc}; stopping") from exc
                pause = RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S) - 1)]
                log.warning("online-store write of %d+%d rows failed (attempt %d of %d, %s: %s); retrying in %.1f s",
                            len(users), len(items), attempt + 1, self.retries + 1, reason, exc, pause)
                attempt += 1
                await asyncio.sleep(pause)


def _extend(pending: list[float] | None, times: Sequence[float] | None, rows: Sequence[Row]) -> list[float] | None:
    """The pending event times with ``times`` added; None (freshness per row) once rows came without them."""
    if pending is None or (times is None and rows):
        return None
    if times:
        pending.extend(times)
    return pending
