"""The scorer client against a real HTTP server: timeouts, the circuit breaker, the half-open trial."""

from __future__ import annotations

import asyncio
import time

import pytest

from driftrec.core.broker import free_port
from driftrec.streams.scorer_client import CircuitBreaker, ScorerClient, ScorerUnavailable
from driftrec.testing.slow_scorer import SlowScorer


async def _call(client: ScorerClient) -> str:
    try:
        await client.recommend("u1", [{"item_id": "i9"}], k=3, domain=None, exclude=[])
        return "ok"
    except ScorerUnavailable as exc:
        return exc.reason


async def test_a_slow_scorer_opens_the_circuit_then_calls_fail_fast_without_reaching_it():
    with SlowScorer(delay_s=5.0) as slow:
        client = ScorerClient(slow.url, timeout_s=0.3, circuit_failures=3, circuit_open_s=60)
        try:
            t0 = time.perf_counter()
            reasons = [await _call(client) for _ in range(10)]
            elapsed = time.perf_counter() - t0
        finally:
            await client.close()
    assert reasons == ["scorer_timeout"] * 3 + ["scorer_circuit_open"] * 7
    assert slow.calls == 3 and client.calls == 3
    assert client.breaker.state == "open"
    assert elapsed < 3 * 0.3 + 1.0  # seven answers cost nothing (10 timeouts would take 3 s)


async def test_after_the_open_period_one_trial_closes_or_reopens_the_circuit():
    with SlowScorer(delay_s=5.0) as slow:
        client = ScorerClient(slow.url, timeout_s=0.2, circuit_failures=2, circuit_open_s=0.5)
        try:
            assert [await _call(client) for _ in range(3)] == ["scorer_timeout", "scorer_timeout", "scorer_circuit_open"]
            await asyncio.sleep(0.6)
            # half-open: one trial goes through, the concurrent callers fail fast; the trial fails -> open again
            got = await asyncio.gather(*(_call(client) for _ in range(4)))
            assert sorted(got) == ["scorer_circuit_open"] * 3 + ["scorer_timeout"]
            assert slow.calls == 3 and client.breaker.state == "open" and client.breaker.opened == 2
            slow.delay_s = 0.0  # the scorer recovers
            assert await _call(client) == "scorer_circuit_open"
            await asyncio.sleep(0.6)
            assert await _call(client) == "ok"
            assert client.breaker.state == "closed"
            assert [await _call(client) for _ in range(3)] == ["ok"] * 3
        finally:
            await client.close()


async def test_a_refused_connection_opens_the_circuit_at_once():
    client = ScorerClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, circuit_failures=5, circuit_open_s=60)
    try:
        assert [await _call(client) for _ in range(3)] == ["scorer_unavailable", "scorer_circuit_open", "scorer_circuit_open"]
        assert client.calls == 1
    finally:
        await client.close()


def test_breaker_settings_are_validated():
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=0)
