"""The offline log: every feature row the stream writes online, appended to Feast's offline store.

The online store holds each entity's newest row; training sets need the rows *as of* past times
(point-in-time joins). The writer process (:mod:`driftrec.feature_store.process`) hands every batch it
wrote online to an :class:`OfflineLog`, which buffers the rows and appends them as Parquet files to
the feature views' file sources - ``<repo_dir>/offline/<view>/part-<ns>-<pid>.parquet``, the directory
each view's ``FileSource`` points at (:mod:`driftrec.feature_store.definitions`) - so Feast's
``get_historical_features`` and ``feast materialize`` read what the stream wrote.

A file is written when ``feast.offline_flush_rows`` rows are buffered, when ``feast.offline_flush_s``
passed since the first buffered row (checked at every write and while the writer idles), and when the
writer stops. Files are written under a dot-name and renamed into place, so a reader never sees half
of one. Columns: the join key, every feature of the view (lists as the JSON strings the online store
holds), ``event_timestamp`` (the row's event time, UTC) and ``created`` (when it was written).

The online write happens first and does not wait for this one: the writer process appends on a thread
of its own (:class:`BackgroundFlusher`), so the next online write does not wait behind a Parquet file
either (a flush of ten seconds of rows took ~0.2-0.3 s, and every event behind it waited as long: the
freshness tail). Rows still buffered when the writer process is killed (a write past its deadline) are not in the offline log - they are online, and the
next write of the same entities carries their newer values.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

from driftrec.feature_store.codec import ITEM_CODEC, USER_CODEC, Row, RowCodec

log = logging.getLogger(__name__)

__all__ = ["BackgroundFlusher", "OfflineLog", "view_dir"]


def view_dir(repo_dir: Path, view: str) -> Path:
    """The folder of ``view``'s offline Parquet files (its ``FileSource`` path)."""
    return Path(repo_dir) / "offline" / view


class OfflineLog:
    """Buffers written rows per feature view and appends them as Parquet files (see the module docstring)."""

    def __init__(self, repo_dir: Path, *, flush_s: float = 10.0, flush_rows: int = 50_000) -> None:
        self.repo_dir = Path(repo_dir)
        self.flush_s = flush_s
        self.flush_rows = flush_rows
        self._buffers: dict[str, tuple[RowCodec, list[Row]]] = {c.view: (c, []) for c in (USER_CODEC, ITEM_CODEC)}
        self._first: float | None = None  # monotonic time of the oldest buffered row
        self.files_written = 0
        self.rows_written = 0

    @property
    def buffered(self) -> int:
        return sum(len(rows) for _, rows in self._buffers.values())

    def add(self, user_rows: Sequence[Row], item_rows: Sequence[Row], *, flush: bool = True) -> None:
        """Buffer one written batch (call after the online write succeeded); with ``flush``, write the
        buffer when it is due (:meth:`maybe_flush`)."""
        if not user_rows and not item_rows:
            return
        self._buffers[USER_CODEC.view][1].extend(user_rows)
        self._buffers[ITEM_CODEC.view][1].extend(item_rows)
        if self._first is None:
            self._first = time.monotonic()
        if flush:
            self.maybe_flush()

    @property
    def due(self) -> bool:
        """Whether the buffer should be written now (full, or ``flush_s`` old)."""
        return self._first is not None and (self.buffered >= self.flush_rows or self.due_in() == 0)

    def take(self) -> tuple[dict[str, list[Row]], float | None]:
        """Hand the buffered rows over (to :meth:`write`) and start an empty buffer."""
        taken = {view: list(rows) for view, (_, rows) in self._buffers.items()}
        first = self._first
        for _, rows in self._buffers.values():
            rows.clear()
        self._first = None
        return taken, first

    def give_back(self, taken: tuple[dict[str, list[Row]], float | None]) -> None:
        """Rows :meth:`take` handed over that could not be written: back in front of what came since."""
        rows_by_view, first = taken
        for view, (_, rows) in self._buffers.items():
            rows[:0] = rows_by_view.get(view, [])
        if first is not None and (self._first is None or first < self._first):
            self._first = first

    def due_in(self) -> float | None:
        """Seconds until the buffer is due (0 = now); None when it is empty."""
        if self._first is None:
            return None
        return max(0.0, self._first + self.flush_s - time.monotonic())

    def maybe_flush(self) -> int:
        if self.due:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Write every buffered row; returns how many. On failure the rows stay buffered."""
        taken = self.take()
        try:
            return self.write(taken[0])
        except BaseException:
            self.give_back(taken)
            raise

    def write(self, rows_by_view: dict[str, list[Row]]) -> int:
        """Append ``rows_by_view`` (view -> rows, from :meth:`take`) as one Parquet file per view; returns
        how many rows."""
        import pandas as pd

        written = 0
        created = pd.Timestamp.now(tz="UTC")
        for view, (codec, _) in self._buffers.items():
            rows = rows_by_view.get(view)
            if not rows:
                continue
            frame = self._frame(codec, rows, created)
            folder = view_dir(self.repo_dir, view)
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
            tmp = folder / f".{name}.tmp"
            frame.to_parquet(tmp, index=False)
            tmp.replace(folder / name)
            written += len(rows)
            self.files_written += 1
            rows_by_view[view] = []  # written: a retry of the rest does not write these again
        self.rows_written += written
        return written

    def retry_later(self) -> None:
        """After a failed flush: try again in ``flush_s``; past ten times ``flush_rows`` buffered rows the
        buffer is dropped (memory stays bounded while the offline store cannot be written)."""
        if self.buffered > 10 * self.flush_rows:
            log.error("dropping %d feature rows the offline store could not take", self.buffered)
            for _, rows in self._buffers.values():
                rows.clear()
            self._first = None
        else:
            self._first = time.monotonic()

    @staticmethod
    def _frame(codec: RowCodec, rows: Sequence[Row], created):
        import pandas as pd

        data: dict[str, list] = {codec.join_key: [str(r[codec.join_key]) for r in rows]}
        for name, kind in codec.features:
            values = [r[name] for r in rows]
            if kind == "String":
                data[name] = [v if isinstance(v, str) else str(v) for v in values]
            elif kind == "Int64":
                data[name] = [int(v) for v in values]
            else:
                data[name] = [float(v) for v in values]
        frame = pd.DataFrame(data)
        for name, kind in codec.features:
            frame[name] = frame[name].astype({"String": "string", "Int64": "int64", "Float64": "float64"}[kind])
        frame["event_timestamp"] = pd.to_datetime([float(r["last_event_time"]) for r in rows], unit="s", utc=True)
        frame["created"] = created
        return frame


class BackgroundFlusher:
    """Runs an :class:`OfflineLog`'s flushes on a thread of their own: :meth:`add` only buffers (under a
    lock) and returns, the thread writes the buffer when it is due - full, or ``flush_s`` old - and
    :meth:`close` writes what is left. A failed write keeps the rows buffered (in front) and is tried again
    after ``flush_s`` (:meth:`OfflineLog.retry_later` bounds the buffer)."""

    def __init__(self, offline: OfflineLog) -> None:
        import threading

        self.offline = offline
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="driftrec-offline-flush", daemon=True)
        self._thread.start()

    def add(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        with self._lock:
            was_empty = self.offline._first is None
            self.offline.add(user_rows, item_rows, flush=False)
            if was_empty or self.offline.due:
                self._wake.set()  # start the clock, or write now

    def _run(self) -> None:
        while True:
            with self._lock:
                due_in = self.offline.due_in()
                taken = self.offline.take() if self.offline.due else None
            if taken is None:
                if self._closed:
                    return
                self._wake.wait(due_in)  # None (empty): until the next add
                self._wake.clear()
                continue
            try:
                self.offline.write(taken[0])
            except Exception:  # noqa: BLE001 - the online write stands; the rows stay buffered for the next try
                log.exception("appending feature rows to the offline store failed")
                with self._lock:
                    self.offline.give_back(taken)
                    self.offline.retry_later()
                if self._closed:
                    return

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread, then write what is still buffered (in the caller's thread)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            if self.offline.buffered:
                self.offline.flush()
