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
  is retried by the row sink like any other;
* every write has a deadline (``feast.write_timeout_s``, the send included): a child that does not
  answer in time - a hung Redis, a locked SQLite file, the child itself stopped - is killed
  (SIGKILL: it cannot come back later and write what it held), and the write fails with reason
  ``timeout``; the row sink (:mod:`driftrec.feature_store.sink`) retries it in a new child, with
  back-off, a bounded number of times, and then stops the worker. A killed child's write may have
  landed in part or in full (Redis may even apply commands it received before the kill after the
  retry); that is safe because rows are absolute values and both stores only write a row whose
  event time is not older than the stored one.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

import orjson

from driftrec.core.settings import Settings
from driftrec.feature_store.backends import get_backend
from driftrec.feature_store.codec import Row
from driftrec.feature_store.offline import BackgroundFlusher, OfflineLog
from driftrec.feature_store.repo import open_store
from driftrec.feature_store.writer import FeatureWriter, WriteFailed

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # importing Feast in a fresh interpreter on a loaded 2-core machine
# A message up to this size fits the pipe's buffer (64 KiB on Linux) even when the child is not reading
# (stopped, hung): it is sent from the loop. Larger ones are sent from a thread, so the deadline holds.
_SEND_INLINE_MAX = 32 * 1024


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
    f = settings.feast
    gc.collect()
    gc.freeze()  # what Feast's import built stays out of the collector's walks (see driftrec.streams.app)
    # the offline appends run on a thread of their own: an online write never waits behind a Parquet file
    offline = (BackgroundFlusher(OfflineLog(Path(f.repo_dir).resolve(), flush_s=f.offline_flush_s,
                                            flush_rows=f.offline_flush_rows)) if f.offline_log else None)
    sys.setswitchinterval(0.001)  # the writing thread gets the GIL back within 1 ms of a flush holding it
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
                continue
            if offline is not None:
                offline.add(users, items)  # after the answer: the online write's latency does not include it
    finally:
        if offline is not None:
            try:
                offline.close()
            except Exception:  # noqa: BLE001 - the online writes stand
                logging.getLogger(__name__).exception("appending feature rows to the offline store failed")
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
        self._sending: threading.Event | None = None  # set when the last send from a thread is over

    async def _start(self) -> None:
        await asyncio.to_thread(open_store, self.settings, self.store_name)  # apply the definitions once, here
        await self._spawn()

    async def _spawn(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, name=f"driftrec-{self.store_name}-writer", daemon=True,
                           args=(child, self.settings.dump_without_secrets(), self.store_name))
        # the first start launches the fork server, which imports Feast (seconds): not on the event loop
        await asyncio.to_thread(proc.start)
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
            try:
                await self._spawn()
            except asyncio.TimeoutError as exc:
                raise WriteFailed("timeout", f"a new {self.store_name} writer process did not start in "
                                             f"{START_TIMEOUT_S:.0f} s") from exc
            except Exception as exc:  # noqa: BLE001 - e.g. the store could not be opened
                raise WriteFailed("writer_start", f"could not start a {self.store_name} writer process: {exc}") from exc
        timeout = self.settings.feast.write_timeout_s
        message = orjson.dumps([user_rows, item_rows])
        try:
            error = await asyncio.wait_for(self._exchange(message), timeout)
        except asyncio.TimeoutError:
            pid = self.pid
            await asyncio.to_thread(self._kill_child)
            raise WriteFailed("timeout", f"the {self.store_name} writer process {pid} did not answer within "
                                         f"{timeout:g} s (feast.write_timeout_s); killed it") from None
        except asyncio.CancelledError:
            self._kill_child()  # its answer would otherwise be taken for the next write's
            raise
        except (EOFError, OSError) as exc:
            self._stop_child()
            raise WriteFailed("writer_exited", f"the {self.store_name} writer process went away: {exc!r}") from exc
        if error:
            raise WriteFailed("store_error", f"{self.store_name} write failed: {error}")

    async def _exchange(self, message: bytes) -> str:
        """Send one write, await its answer."""
        # One write in flight (the caller serialises) and the previous answer read, so the child has
        # read everything sent before: a small message goes into the empty pipe without blocking.
        conn = self._conn
        if len(message) <= _SEND_INLINE_MAX:
            conn.send_bytes(message)
        else:
            sent = self._sending = threading.Event()

            def send() -> None:
                try:
                    conn.send_bytes(message)
                finally:
                    sent.set()

            await asyncio.to_thread(send)
        return await self._reply()

    def _kill_child(self) -> None:
        """Kill the child at once (it may be stopped or stuck in a call), then reap it."""
        proc, sending = self._proc, self._sending
        if proc is not None and proc.is_alive():
            proc.kill()
        if sending is not None:
            sending.wait(5)  # a send blocked on the dead child's pipe fails now; only then close its fd
        self._stop_child()

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
