"""The writer process: a child of the worker that owns the online-store connection and writes the rows.

A worker spends its main thread on the stream (fetching, validating, applying events to state); the
rows it produces for the online store cost as much again to encode and write - SQLite does its
B-tree work in the writing process, and Redis' client packs every command in Python. A thread
does not help: it shares the interpreter lock, and ``sqlite3`` gives the lock up around every
statement, so while the event loop is busy every statement waits out the switch interval -
measured here, 3,000 rows took 0.1 s from an idle process and 25-55 s beside one busy Python thread.
A process runs on the other core:

* the parent (:class:`ProcessWriter`, the :class:`~driftrec.feature_store.writer.FeatureWriter` every worker
  uses) sends each batch of rows as one JSON message over a pipe and awaits the reply without
  blocking its loop;
* the child runs the backend's blocking row store (``feature_store.<backend>.Rows``) - the one
  writer Feast's SQLite store needs - and answers with an empty message when the rows are
  committed (readable), or the error;
* children are forked from a fork server that has imported Feast once (:func:`_context`);
* the child exits when the pipe closes, and dies with the worker even on SIGKILL
  (``PR_SET_PDEATHSIG``); a child that died is started again on the next write, so a failed write
  is retried by the row sink like any other.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import signal
from typing import Sequence

import orjson

from driftrec.core.settings import Settings
from driftrec.feature_store.backends import get_backend
from driftrec.feature_store.codec import Row
from driftrec.feature_store.repo import open_store
from driftrec.feature_store.writer import FeatureWriter

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # importing Feast in a fresh interpreter on a loaded 2-core machine


def _serve(conn, settings_json: str, store: str) -> None:  # pragma: no cover - runs in the child
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop (it closes the pipe)
    try:
        settings = Settings(**orjson.loads(settings_json))
        # the parent applied the definitions; the child only opens the store
        rows = get_backend(store).rows(open_store(settings, store, apply=False))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send_bytes(f"could not open the {store} online store: {exc!r}".encode())
        return
    gc.collect()
    gc.freeze()  # what Feast's import built stays out of the collector's walks (see driftrec.streams.app)
    conn.send_bytes(b"")
    try:
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:
                return
            try:
                users, items = orjson.loads(message)
                rows.write(users, items)
                conn.send_bytes(b"")
            except Exception as exc:  # noqa: BLE001 - the parent retries
                conn.send_bytes((repr(exc)[:2000] or "write failed").encode())
    finally:
        rows.close()


def _context():
    """Children come from a fork server: a clean single-threaded process that has imported Feast once,
    so a writer starts in milliseconds (forking the worker itself, which runs threads, is not safe;
    spawning a fresh interpreter per writer costs seconds)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["driftrec.feature_store.process", "driftrec.feature_store.backends.sqlite", "driftrec.feature_store.backends.redis",
                                "feast.infra.online_stores.sqlite", "feast.infra.online_stores.redis", "feast"])
    return ctx


class ProcessWriter(FeatureWriter):
    """Writes rows through a child process running the backend's row store."""

    def __init__(self, settings: Settings, store: str | None = None) -> None:
        self.store_name = store or settings.feast.online_store
        super().__init__(settings)
        self._proc = None
        self._conn = None

    async def _start(self) -> None:
        await asyncio.to_thread(open_store, self.settings, self.store_name)  # apply the definitions once, here
        await self._spawn()

    async def _spawn(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, name=f"driftrec-{self.store_name}-writer", daemon=True,
                           args=(child, self.settings.dump_without_secrets(), self.store_name))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            error = await asyncio.wait_for(self._reply(), START_TIMEOUT_S)
        except BaseException:
            self._stop_child()
            raise
        if error:
            self._stop_child()
            raise RuntimeError(error)
        log.info("%s writer process %s ready", self.store_name, proc.pid)

    async def _reply(self) -> str:
        """The child's next answer: '' for done, else the error. Raises EOFError if it died."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        fut = loop.create_future()

        def readable() -> None:
            if fut.done():
                return
            try:
                fut.set_result(conn.recv_bytes().decode())
            except BaseException as exc:  # noqa: BLE001 - EOF: the child is gone
                fut.set_exception(exc)

        fd = conn.fileno()
        loop.add_reader(fd, readable)
        try:
            return await fut
        finally:
            loop.remove_reader(fd)

    async def _write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                log.warning("%s writer process exited (%s); starting another", self.store_name, self._proc.exitcode)
                self._stop_child()
            await self._spawn()
        try:
            # One write in flight (the caller serialises), so the child is reading: the send does
            # not wait on it for long even when the message is larger than the pipe's buffer.
            self._conn.send_bytes(orjson.dumps([user_rows, item_rows]))
            error = await self._reply()
        except (EOFError, OSError) as exc:
            self._stop_child()
            raise RuntimeError(f"the {self.store_name} writer process went away: {exc!r}") from exc
        if error:
            raise RuntimeError(f"{self.store_name} write failed: {error}")

    def _stop_child(self) -> None:
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    async def _close(self) -> None:
        await asyncio.to_thread(self._stop_child)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def create_writer(settings: Settings, store: str | None = None) -> FeatureWriter:
    """The writer for ``store`` (default ``settings.feast.online_store``): the backend's row store,
    run by a writer process."""
    return ProcessWriter(settings, store)
