"""The recommend stage: answer recommendation requests on the recommendations topic.

For each request the stage ranks candidates and publishes a :class:`Recommendation` keyed by user
id. Ranking goes through :class:`driftrec.streams.ranking.Ranker`; when the LM scorer cannot answer, the
fallback ranking (time-decayed popularity over this worker's stream, excluding what the user has
seen) is used and the output is flagged ``fallback=true``.

The requests of one fetched batch are ranked concurrently (``ranking.max_concurrency`` at a time) under
one deadline (``ranking.batch_deadline_s``): a slow scorer costs the batch at most that, and a request
not ranked by then is answered from the fallback (``driftrec_recommendation_fallbacks_total{reason=
"deadline"}``). Clicks and ratings keep their place: the requests before one are ranked (and their
answers sent, in request order) before the ranker learns from it, so a ranker sees exactly what it would
see one event at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Sequence

from driftrec.core import metrics
from driftrec.core.contracts import Click, Rating, Recommendation, RecommendationRequest, new_event_id
from driftrec.streams import api
from driftrec.streams.app import send_soon
from driftrec.streams.pipeline import Accepted, StageResult
from driftrec.streams.rankers import build_ranker

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)


def _deadline_fallback(ranker, req: RecommendationRequest):
    """The flagged fallback answer for a request the batch deadline left unranked (and counted)."""
    metrics.FALLBACKS.labels(reason="deadline").inc()
    return ranker.fallback(req, reason="popular right now (ranking deadline passed)")


async def rank_all(ranker, requests: Sequence[RecommendationRequest], deadline: float, limit: int) -> list:
    """Rank ``requests`` concurrently (at most ``limit`` at a time) until the monotonic ``deadline``;
    what is not ranked by then gets the flagged fallback. Answers are in request order.

    A ranker that never waits (``rank_now``: the ranking policy is CPU work on this thread) ranks them one
    after another without leaving the event loop: concurrency buys it nothing, and every task and wait
    would hand the loop to its other work (the followers, the state updates) between the requests of a
    batch; a request not begun by the deadline gets the fallback as above."""
    rank_now = getattr(ranker, "rank_now", None)
    if rank_now is not None:
        prepare = getattr(ranker, "prepare", None)
        if prepare is not None and time.monotonic() < deadline:
            prepare(requests)  # what the requests share, batched (the ranking policy: its user vectors)
        out = []
        for req in requests:
            if time.monotonic() >= deadline:
                out.append(_deadline_fallback(ranker, req))
            else:
                out.append(rank_now(req))
        return out
    sem = asyncio.Semaphore(limit)

    async def one(req):
        async with sem:
            if time.monotonic() >= deadline:
                return None
            return await ranker.rank(req)

    tasks = [asyncio.ensure_future(one(r)) for r in requests]
    remaining = deadline - time.monotonic()
    if remaining > 0:
        await asyncio.wait(tasks, timeout=remaining)
    late = [t for t in tasks if not t.done()]
    for t in late:
        t.cancel()
    if late:
        await asyncio.gather(*late, return_exceptions=True)  # let the cancellations land
    failed = next((t.exception() for t in tasks if t not in late and t.exception() is not None), None)
    if failed is not None:
        raise failed  # a ranker's own exception is the stage's failure, as one request at a time
    out = []
    for req, task in zip(requests, tasks):
        ranked = None if task in late else task.result()
        out.append(_deadline_fallback(ranker, req) if ranked is None else ranked)
    return out


def register(app: "DriftrecApp") -> None:
    settings = app.settings
    out_topic = settings.topics.recommendations.name
    ranker = build_ranker(app)
    app.ranker = ranker  # type: ignore[attr-defined] - for tests
    api.register(app, ranker)  # the synchronous API ranks with the same ranker
    budget_s, limit = settings.ranking.batch_deadline_s, settings.ranking.max_concurrency

    async def stage(batch: Sequence[Accepted]):
        futures = []
        deadline = time.monotonic() + budget_s
        pending: list[RecommendationRequest] = []

        async def answer() -> None:
            ranked_all = await rank_all(ranker, pending, deadline, limit)
            for ev, ranked in zip(pending, ranked_all):
                now = time.time()
                rec = Recommendation(
                    event_id=new_event_id(),
                    event_time=now,
                    request_id=ev.event_id,
                    user_id=ev.user_id,
                    items=ranked.items,
                    model_version=ranked.model_version,
                    adapter_version=ranked.adapter_version,
                    domain=ranked.domain,
                    fallback=ranked.fallback,
                    produced_at=now,
                )
                futures.append(await send_soon(app, out_topic, rec.dumps(), key=ev.user_id.encode()))
                metrics.RECOMMENDATIONS_PUBLISHED.inc()
                metrics.E2E_LATENCY_SECONDS.observe(max(now - ev.event_time, 0.0))
            pending.clear()

        for acc in batch:
            ev = acc.event
            if isinstance(ev, (Click, Rating)):
                if pending:
                    await answer()
                ranker.learn(ev)
            elif isinstance(ev, RecommendationRequest):
                pending.append(ev)
        if pending:
            await answer()
        return StageResult(durable=futures) if futures else None

    app.pipeline.register("recommend", stage, types=(Click.TYPE, Rating.TYPE, RecommendationRequest.TYPE))
