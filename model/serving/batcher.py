"""A small asyncio micro-batcher for CPU-bound model forwards.

Requests submit ``(key, payload)``; one worker takes whatever is queued (up to ``max_batch``), groups
it by ``key`` identity (for the scorer: the snapshot, so one batch never mixes two adapters), and runs
``fn(key, payloads) -> results`` on a thread executor. While a forward runs, new requests queue up, so
batches grow with load and a lone request waits for nothing. The queue is bounded: when it is full,
:meth:`MicroBatcher.submit` raises :class:`QueueFull` at once (the server answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

from driftrec.core import metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher's queue is full: shed load."""


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[Any, Sequence[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
    ) -> None:
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue(maxsize=self.max_queue)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="driftrec-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, _, fut, _ = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("scorer shutting down"))

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, key: Any, payload: Any) -> Any:
        if self._queue is None:
            self.start()
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((key, payload, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(f"scoring queue full ({self.max_queue} waiting)") from None
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._forward(loop, batch)
            except asyncio.CancelledError:
                # stopping while a batch is with the model: its requests have left the queue, so stop()
                # would not see them - answer them here rather than leave their callers waiting
                for e in batch:
                    if not e[2].done():
                        e[2].set_exception(RuntimeError("scorer shutting down"))
                raise

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[tuple]) -> None:
        """Score one batch: one forward per key (domain snapshot), each result to its caller."""
        groups: dict[int, list[tuple]] = {}
        for entry in batch:
            groups.setdefault(id(entry[0]), []).append(entry)
        for entries in groups.values():
            live = [e for e in entries if not e[2].done()]  # skip requests already cancelled
            if not live:
                continue
            now = time.perf_counter()
            for e in live:
                metrics.SCORING_QUEUE_SECONDS.observe(now - e[3])
            try:
                results = await loop.run_in_executor(self.executor, self.fn, live[0][0], [e[1] for e in live])
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                for e in live:
                    if not e[2].done():
                        e[2].set_exception(exc)
                continue
            self.batches += 1
            self.items += len(live)
            for e, res in zip(live, results):
                if not e[2].done():
                    e[2].set_result(res)
