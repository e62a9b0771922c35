"""The recommend stage's batch ranking: concurrent, bounded in concurrency, cut at the deadline."""

from __future__ import annotations

import asyncio
import time

from driftrec.core.contracts import RecommendationRequest, RecommendedItem
from driftrec.streams.agents.recommend import rank_all
from driftrec.streams.ranking import Ranked


class TimedRanker:
    """Ranks a request after the delay named in its user id ("u<ms>"); records the concurrency it saw."""

    def __init__(self) -> None:
        self.in_flight = self.peak = 0
        self.cancelled = 0

    async def rank(self, req: RecommendationRequest) -> Ranked:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(int(req.user_id[1:]) / 1000)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        return Ranked(items=[RecommendedItem(item_id=req.user_id, score=1.0, reason="ranked")], fallback=False)

    def fallback(self, req: RecommendationRequest, reason: str = "") -> Ranked:
        return Ranked(items=[RecommendedItem(item_id="popular", score=0.0, reason=reason)], fallback=True)


def _req(ms: int, n: int) -> RecommendationRequest:
    return RecommendationRequest(event_id=f"r{n}", event_time=time.time(), user_id=f"u{ms}", k=1)


async def test_requests_are_ranked_concurrently_up_to_the_limit_in_request_order():
    ranker = TimedRanker()
    reqs = [_req(100, n) for n in range(20)]
    t0 = time.monotonic()
    out = await rank_all(ranker, reqs, deadline=time.monotonic() + 10, limit=5)
    elapsed = time.monotonic() - t0
    assert [r.items[0].item_id for r in out] == ["u100"] * 20 and not any(r.fallback for r in out)
    assert ranker.peak == 5
    assert elapsed < 20 * 0.1 / 2  # four waves of five, not twenty requests one after another


async def test_what_is_not_ranked_by_the_deadline_gets_the_flagged_fallback():
    ranker = TimedRanker()
    reqs = [_req(10, 0), _req(5000, 1), _req(10, 2), _req(5000, 3)]
    t0 = time.monotonic()
    out = await rank_all(ranker, reqs, deadline=time.monotonic() + 0.5, limit=4)
    assert time.monotonic() - t0 < 1.5
    assert [r.fallback for r in out] == [False, True, False, True]
    assert out[1].items[0].reason == "popular right now (ranking deadline passed)"
    assert ranker.cancelled == 2 and ranker.in_flight == 0


async def test_a_passed_deadline_ranks_nothing():
    ranker = TimedRanker()
    out = await rank_all(ranker, [_req(10, n) for n in range(3)], deadline=time.monotonic() - 1, limit=2)
    assert all(r.fallback for r in out) and ranker.peak == 0


class SyncRanker(TimedRanker):
    """A ranker that never waits (``rank_now``, as the ranking policy): it is ranked inline, in order."""

    def __init__(self, clock_step: float = 0.0) -> None:
        super().__init__()
        self.order: list[str] = []
        self.clock_step = clock_step

    def rank_now(self, req: RecommendationRequest) -> Ranked:
        self.order.append(req.event_id)
        time.sleep(self.clock_step)
        return Ranked(items=[RecommendedItem(item_id=req.user_id, score=1.0, reason="ranked")], fallback=False)

    async def rank(self, req: RecommendationRequest) -> Ranked:  # pragma: no cover - rank_all must not use it
        raise AssertionError("rank_all awaited rank() of a ranker that ranks inline")


async def test_a_ranker_that_never_waits_is_ranked_inline_in_request_order():
    ranker = SyncRanker()
    reqs = [_req(1, n) for n in range(6)]
    loop_turns = []
    ticker = asyncio.get_running_loop().call_soon(loop_turns.append, 1)  # runs at the loop's next turn
    out = await rank_all(ranker, reqs, deadline=time.monotonic() + 10, limit=2)
    assert not loop_turns, "ranking inline must not hand the event loop to other work between requests"
    ticker.cancel()
    assert ranker.order == [r.event_id for r in reqs] and not any(r.fallback for r in out)


async def test_a_ranker_that_never_waits_stops_at_the_deadline():
    ranker = SyncRanker(clock_step=0.2)
    out = await rank_all(ranker, [_req(1, n) for n in range(4)], deadline=time.monotonic() + 0.3, limit=4)
    assert [r.fallback for r in out] == [False, False, True, True]
    assert out[2].items[0].reason == "popular right now (ranking deadline passed)"


async def test_a_ranker_that_never_waits_prepares_the_whole_batch_first():
    """``prepare`` (the ranking policy: the batch's user vectors in one forward) sees every request of the
    batch before the first is ranked."""
    seen: list = []

    class Preparing(SyncRanker):
        def prepare(self, requests) -> None:
            seen.append(([r.event_id for r in requests], list(self.order)))

    ranker = Preparing()
    reqs = [_req(1, n) for n in range(5)]
    await rank_all(ranker, reqs, deadline=time.monotonic() + 10, limit=2)
    assert seen == [([r.event_id for r in reqs], [])]
    assert ranker.order == [r.event_id for r in reqs]
    seen.clear()
    out = await rank_all(ranker, reqs, deadline=time.monotonic() - 1, limit=2)  # too late: nothing to prepare for
    assert seen == [] and all(r.fallback for r in out)
