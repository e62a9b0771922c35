"""MicroBatcher in process: batching under load, grouping by key, routing, errors, shedding, shutdown.

The forward runs on a real one-thread executor; a ``threading.Event`` holds it so that requests queue
up behind it deterministically (no timing guesses).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from driftrec.model.serving.batcher import MicroBatcher, QueueFull


class _Forward:
    """``fn(key, payloads)``: records every call; ``gate`` (when set up) holds the first call."""

    def __init__(self, *, hold_first: bool = False, fail_for=None):
        self.calls: list[tuple[object, list]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        self.fail_for = fail_for  # a key whose forwards raise

    def __call__(self, key, payloads):
        first = not self.calls
        self.calls.append((key, list(payloads)))
        self.entered.set()
        if first and self.hold_first:
            assert self.gate.wait(10), "test never released the forward"
        if key is self.fail_for:
            raise ValueError(f"forward failed for {key!r}")
        return [(key, p * 10) for p in payloads]


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


async def _wait_entered(fwd: _Forward) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, fwd.entered.wait, 5), 6)


async def _until(cond, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_lone_request_is_answered_without_waiting_for_company(executor):
    fwd = _Forward()
    mb = MicroBatcher(fwd, executor, max_batch=8)
    key = object()
    try:
        res = await asyncio.wait_for(mb.submit(key, 3), 5)
    finally:
        await mb.stop()
    assert res == (key, 30)
    assert fwd.calls == [(key, [3])]
    assert (mb.batches, mb.items) == (1, 1)


async def test_requests_queued_behind_a_forward_form_batches_of_at_most_max_batch(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=4, max_queue=64)
    key = object()
    try:
        first = asyncio.ensure_future(mb.submit(key, 0))
        await _wait_entered(fwd)  # the worker is busy with request 0
        rest = [asyncio.ensure_future(mb.submit(key, i)) for i in range(1, 11)]
        await _until(lambda: mb.depth == 10)
        fwd.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    finally:
        await mb.stop()
    # Every caller gets the result of its own payload.
    assert results == [(key, i * 10) for i in range(11)]
    # One lone forward, then the queue drained in FIFO order, max_batch at a time.
    assert [p for _, p in fwd.calls] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert (mb.batches, mb.items) == (4, 11)


async def test_one_batch_never_mixes_keys_and_results_go_to_the_right_caller(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=16)
    a, b = object(), object()
    try:
        first = asyncio.ensure_future(mb.submit(a, 0))
        await _wait_entered(fwd)
        order = [(a, 1), (b, 2), (a, 3), (b, 4), (b, 5)]
        futs = [asyncio.ensure_future(mb.submit(k, p)) for k, p in order]
        await _until(lambda: mb.depth == len(order))
        fwd.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*futs), 5)
        await first
    finally:
        await mb.stop()
    assert results == [(k, p * 10) for k, p in order]
    # Grouped by key identity, each group in arrival order.
    assert fwd.calls[1:] == [(a, [1, 3]), (b, [2, 4, 5])]


async def test_a_failed_forward_reaches_every_caller_of_its_group_only(executor):
    good, bad = object(), object()
    fwd = _Forward(hold_first=True, fail_for=bad)
    mb = MicroBatcher(fwd, executor, max_batch=16)
    try:
        first = asyncio.ensure_future(mb.submit(good, 0))
        await _wait_entered(fwd)
        bad_futs = [asyncio.ensure_future(mb.submit(bad, i)) for i in (1, 2, 3)]
        good_fut = asyncio.ensure_future(mb.submit(good, 4))
        await _until(lambda: mb.depth == 4)
        fwd.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*bad_futs, good_fut, return_exceptions=True), 5)
        await first
        # The worker survives the failure and keeps serving.
        assert await asyncio.wait_for(mb.submit(good, 7), 5) == (good, 70)
    finally:
        await mb.stop()
    errors, ok = outcomes[:3], outcomes[3]
    assert all(isinstance(e, ValueError) and "forward failed" in str(e) for e in errors)
    assert ok == (good, 40)
    assert mb.items == 3  # 0, 4 and 7; the failed group is not counted


async def test_submit_raises_queue_full_at_once_when_the_queue_is_full(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=8, max_queue=2)
    key = object()
    try:
        first = asyncio.ensure_future(mb.submit(key, 0))
        await _wait_entered(fwd)
        queued = [asyncio.ensure_future(mb.submit(key, i)) for i in (1, 2)]
        await _until(lambda: mb.depth == 2)
        with pytest.raises(QueueFull, match="2 waiting"):
            await asyncio.wait_for(mb.submit(key, 3), 1)
        fwd.gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *queued), 5) == [(key, 0), (key, 10), (key, 20)]
        # Room again once drained.
        assert await asyncio.wait_for(mb.submit(key, 4), 5) == (key, 40)
    finally:
        await mb.stop()
    assert [p for _, p in fwd.calls] == [[0], [1, 2], [4]]


async def test_cancelled_requests_are_not_forwarded(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=8)
    key = object()
    try:
        first = asyncio.ensure_future(mb.submit(key, 0))
        await _wait_entered(fwd)
        gone = asyncio.ensure_future(mb.submit(key, 1))
        kept = asyncio.ensure_future(mb.submit(key, 2))
        await _until(lambda: mb.depth == 2)
        gone.cancel()
        fwd.gate.set()
        assert await asyncio.wait_for(kept, 5) == (key, 20)
        await first
    finally:
        await mb.stop()
    assert gone.cancelled()
    assert [p for _, p in fwd.calls] == [[0], [2]]


async def test_stop_fails_requests_still_queued(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=8)
    key = object()
    first = asyncio.ensure_future(mb.submit(key, 0))
    await _wait_entered(fwd)
    waiting = [asyncio.ensure_future(mb.submit(key, i)) for i in (1, 2)]
    await _until(lambda: mb.depth == 2)
    await mb.stop()
    fwd.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(e, RuntimeError) and "shutting down" in str(e) for e in outcomes)
    assert mb.depth == 0
    first.cancel()
    assert [p for _, p in fwd.calls] == [[0]]  # the queued ones never reached the model


async def test_stop_settles_the_requests_of_the_batch_being_forwarded(executor):
    fwd = _Forward(hold_first=True)
    mb = MicroBatcher(fwd, executor, max_batch=8)
    key = object()
    in_flight = asyncio.ensure_future(mb.submit(key, 0))
    await _wait_entered(fwd)
    await mb.stop()
    fwd.gate.set()
    try:
        # Either the forward's result or the shutdown error, but an answer.
        done, _ = await asyncio.wait({in_flight}, timeout=0.5)
        assert done, "the caller of the in-flight batch is still waiting after stop()"
        exc = in_flight.exception()
        assert exc is None or isinstance(exc, RuntimeError)
    finally:
        in_flight.cancel()
