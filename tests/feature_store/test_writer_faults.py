"""The writer process and the row sink under faults: a stopped (hung) writer process, a locked SQLite
file, a store that stays away. Real writer processes and real SQLite files; no fixed sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest

from driftrec.core import metrics
from driftrec.core.settings import Settings
from driftrec.feature_store.process import create_writer
from driftrec.feature_store.reader import FeatureReader
from driftrec.feature_store.sink import RowSink, RowSinkFailed
from driftrec.feature_store.writer import FeatureWriter, WriteFailed

pytestmark = pytest.mark.faults


def _settings(tmp_path, **feast) -> Settings:
    return Settings(feast={"repo_dir": str(tmp_path / "feast"), "online_store": "sqlite",
                           "project": f"f_{uuid.uuid4().hex[:12]}", **feast})


def _user(uid, t, clicks):
    return {"user_id": uid, "recent_items": "[]", "click_count": clicks, "rating_count": 0, "mean_rating": 0.0,
            "last_event_time": t, "genre_profile": "{}"}


def _failures(store, reason):
    return metrics.FEATURE_WRITE_FAILURES.labels(store=store, reason=reason)._value.get()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_stopped_writer_process_is_killed_and_the_write_retried_in_a_new_one(tmp_path):
    """SIGSTOP the writer process: the write times out (feast.write_timeout_s), the child is killed, the
    row sink retries in a new child, the rows land once; the failure metric moves (reason=timeout)."""
    settings = _settings(tmp_path, write_timeout_s=1.5)
    t = time.time()
    async with create_writer(settings) as writer:
        await writer.write_batch([_user("s1", t, 1)], [])
        old = writer.pid
        before = _failures("sqlite", "timeout")
        sink = RowSink(writer)
        os.kill(old, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # big enough not to fit the pipe's buffer: the send itself must not block the loop
            rows = [_user(f"s{k}", t + 1, k) for k in range(2, 1500)]
            await asyncio.wait_for(sink.submit(rows, []), 60)
            took = time.monotonic() - t0
        finally:
            if not _gone(old):
                os.kill(old, signal.SIGCONT)
        assert writer.pid not in (None, old) and _gone(old)
        assert _failures("sqlite", "timeout") == before + 1
        assert 1.5 <= took < 30
    reader = FeatureReader(settings)
    assert reader.get_user_and_items("s1", [])[0]["click_count"] == 1
    assert reader.get_user_and_items("s1499", [])[0]["click_count"] == 1499
    reader.close()


async def test_the_event_loop_keeps_running_while_the_writer_hangs(tmp_path):
    """A hung child never blocks the worker's loop (large messages are sent from a thread)."""
    settings = _settings(tmp_path, write_timeout_s=1.0)
    t = time.time()
    async with create_writer(settings) as writer:
        await writer.write_batch([_user("h0", t, 1)], [])
        old = writer.pid
        os.kill(old, signal.SIGSTOP)
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.05)

        ticker = asyncio.ensure_future(tick())
        try:
            with pytest.raises(WriteFailed) as err:
                await writer.write_batch([_user(f"h{k}", t, k) for k in range(3000)], [])
        finally:
            ticker.cancel()
            if not _gone(old):
                os.kill(old, signal.SIGCONT)
        assert err.value.reason == "timeout" and ticks >= 10
        await writer.write_batch([_user("h1", t, 7)], [])  # a new child
        assert writer.pid != old


async def test_a_locked_sqlite_file_times_out_then_the_retry_lands(tmp_path):
    """Another connection holds the database's write lock longer than the write timeout: the write times
    out (the child is killed while waiting for the lock), and once the lock is released the retry lands."""
    from driftrec.feature_store.backends.sqlite import db_path

    settings = _settings(tmp_path, write_timeout_s=1.0)
    t = time.time()
    async with create_writer(settings) as writer:
        await writer.write_batch([_user("l1", t, 1)], [])
        before = _failures("sqlite", "timeout")
        locker = sqlite3.connect(db_path(settings), timeout=30, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")
        sink = RowSink(writer)
        done = sink.submit([_user("l1", t + 1, 2)], [])
        released = threading.Event()

        def release_after_a_timeout():
            deadline = time.monotonic() + 60
            while _failures("sqlite", "timeout") < before + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            locker.rollback()
            locker.close()
            released.set()

        th = threading.Thread(target=release_after_a_timeout)
        th.start()
        await asyncio.wait_for(done, 60)
        th.join()
        assert released.is_set() and _failures("sqlite", "timeout") >= before + 1
    reader = FeatureReader(settings)
    assert reader.get_user_and_items("l1", [])[0]["click_count"] == 2
    reader.close()


class _AwayWriter(FeatureWriter):
    store_name = "sqlite"

    def __init__(self, settings, fail_times):
        super().__init__(settings)
        self.fail_times, self.calls, self.rows = fail_times, 0, {}

    async def _start(self):
        return None

    async def _write(self, users, items):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise WriteFailed("timeout" if self.calls % 2 else "store_error", "store away")
        for r in users:
            self.rows[r["user_id"]] = r


async def test_the_sink_retries_a_bounded_number_of_times_then_fails_loudly(tmp_path, monkeypatch):
    from driftrec.feature_store import sink as sink_module

    monkeypatch.setattr(sink_module, "RETRY_PAUSES_S", (0.01, 0.02))
    settings = _settings(tmp_path, write_retries=3)
    # recovers within the retries
    w = _AwayWriter(settings, fail_times=3)
    s = RowSink(w)
    await asyncio.wait_for(s.submit([_user("r1", 1.0, 1)], []), 10)
    assert w.calls == 4 and w.rows["r1"]["click_count"] == 1 and s.failed is None

    # does not: every pending future fails, on_failure is told once, later submits fail at once
    crashed = []
    w = _AwayWriter(settings, fail_times=100)
    s = RowSink(w, on_failure=crashed.append)
    before = {r: _failures("sqlite", r) for r in ("timeout", "store_error")}
    first = s.submit([_user("r2", 1.0, 1)], [])
    second = s.submit([_user("r3", 1.0, 1)], [])
    with pytest.raises(RowSinkFailed):
        await asyncio.wait_for(first, 10)
    with pytest.raises(RowSinkFailed):
        await second
    assert w.calls == 4 and len(crashed) == 1 and isinstance(crashed[0], RowSinkFailed)
    assert _failures("sqlite", "timeout") - before["timeout"] == 2
    assert _failures("sqlite", "store_error") - before["store_error"] == 2
    with pytest.raises(RowSinkFailed):
        await s.submit([_user("r4", 1.0, 1)], [])
    assert w.calls == 4 and w.rows == {}
