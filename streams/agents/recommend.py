"""The recommend stage: answer recommendation requests on the recommendations topic.

For each request the stage ranks candidates and publishes a :class:`Recommendation` keyed by user
id. Ranking goes through :class:`driftrec.streams.ranking.Ranker`; when the LM scorer cannot answer, the
fallback ranking (time-decayed popularity over this worker's stream, excluding what the user has
seen) is used and the output is flagged ``fallback=true``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Sequence

from driftrec.core import metrics
from driftrec.core.contracts import Click, Rating, Recommendation, RecommendationRequest, new_event_id
from driftrec.streams.pipeline import Accepted, StageResult
from driftrec.streams.rankers import build_ranker

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)


def register(app: "DriftrecApp") -> None:
    settings = app.settings
    out = app.topic(settings.topics.recommendations.name, key_serializer="raw", value_serializer="raw")
    ranker = build_ranker(app)

    async def stage(batch: Sequence[Accepted]):
        futures = []
        for acc in batch:
            ev = acc.event
            if isinstance(ev, (Click, Rating)):
                ranker.learn(ev)
                continue
            if not isinstance(ev, RecommendationRequest):
                continue
            ranked = await ranker.rank(ev)
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
            futures.append(await out.send(key=ev.user_id.encode(), value=rec.dumps()))
            metrics.RECOMMENDATIONS_PUBLISHED.inc()
            metrics.E2E_LATENCY_SECONDS.observe(max(now - ev.event_time, 0.0))
        return StageResult(durable=futures) if futures else None

    app.pipeline.register("recommend", stage, types=(Click.TYPE, Rating.TYPE, RecommendationRequest.TYPE))
