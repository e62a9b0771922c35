"""The worker's synchronous API: a recommendation over HTTP, ranked by the same ranker as the topic path.

``GET /v1/recommendations/{user_id}?k=10&exclude_seen=true&domain=...&at=...`` builds a
:class:`~driftrec.core.contracts.RecommendationRequest` through the event validator (the same limits as a
request on the requests topic: a bad one is a 400 naming the field) and ranks it with the recommend
stage's :class:`~driftrec.streams.ranking.Ranker` on the worker's event loop - with the default ranking
policy, the system ``driftrec evaluate`` measures, and its state follows every worker's interactions, so
any worker answers for any user. ``at`` (optional, a Unix time) ranks as of that time instead of now.
A ranking slower than ``api.timeout_s`` is answered from the flagged fallback, as on the topic path.
``GET /healthz`` says the API is up; ``GET /readyz`` is 200 once the ranker serves its model (503 before).

The app is an aiohttp app factory (:func:`create_api`, state in ``web.AppKey``s) served by
:func:`register` as a task of the worker (``api.enabled``, ``api.host``, ``api.port``; port 0 = a free
one). The bound address is printed as ``driftrec worker: api on HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

from driftrec.core import metrics
from driftrec.core.contracts import RecommendationRequest, new_event_id
from driftrec.core.settings import Settings
from driftrec.core.validation import InvalidEvent, Limits, parse_event
from driftrec.streams.ranking import Ranked, Ranker

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)

RANKER_KEY = web.AppKey("ranker", Ranker)
SETTINGS_KEY = web.AppKey("settings", Settings)

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=_dumps({"error": message}), content_type="application/json")


def _dumps(obj) -> str:
    import json

    return json.dumps(obj)


def request_from_query(user_id: str, query, settings: Settings, now: float) -> RecommendationRequest:
    """The request a query describes, validated like one from the requests topic (raises BadRequest)."""
    unknown = set(query) - {"k", "exclude_seen", "domain", "at"}
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {sorted(unknown)}; use k, exclude_seen, domain, at")
    data: dict = {"type": RecommendationRequest.TYPE, "event_id": new_event_id(), "user_id": user_id}
    if "k" in query:
        try:
            data["k"] = int(query["k"])
        except ValueError:
            raise BadRequest(f"k must be an integer, got {query['k']!r}") from None
    if "exclude_seen" in query:
        flag = _BOOLS.get(query["exclude_seen"].lower())
        if flag is None:
            raise BadRequest(f"exclude_seen must be true or false, got {query['exclude_seen']!r}")
        data["exclude_seen"] = flag
    if "domain" in query:
        data["domain"] = query["domain"]
    at = now
    if "at" in query:
        try:
            at = float(query["at"])
        except ValueError:
            raise BadRequest(f"at must be a Unix time in seconds, got {query['at']!r}") from None
        if not math.isfinite(at):
            raise BadRequest("at must be a finite Unix time")
    data["event_time"] = at
    try:
        event = parse_event(data, limits=Limits.from_settings(settings), now=now)
    except InvalidEvent as exc:
        raise BadRequest(f"{exc.reason}: {exc.detail}") from None
    assert isinstance(event, RecommendationRequest)
    return event


async def recommendations(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    ranker = request.app[RANKER_KEY]
    req = request_from_query(request.match_info["user_id"], request.query, settings, time.time())
    try:
        ranked: Ranked = await asyncio.wait_for(ranker.rank(req), settings.api.timeout_s)
    except asyncio.TimeoutError:
        metrics.FALLBACKS.labels(reason="deadline").inc()
        ranked = ranker.fallback(req, reason="popular right now (ranking deadline passed)")
    return web.json_response({
        "user_id": req.user_id,
        "at": req.event_time,
        "items": [{"item_id": it.item_id, "score": it.score, "reason": it.reason} for it in ranked.items],
        "model_version": ranked.model_version,
        "adapter_version": ranked.adapter_version,
        "domain": ranked.domain,
        "fallback": ranked.fallback,
    })


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[RANKER_KEY].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


@web.middleware
async def _measured(request: web.Request, handler):
    """Latency and status of every request; an unexpected error is a 500 with a message, never a trace."""
    t0 = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:  # noqa: BLE001
        log.exception("the API failed on %s", request.path)
        return web.json_response({"error": "internal error"}, status=500)
    finally:
        if request.path.startswith("/v1/"):
            metrics.API_REQUESTS.labels(status=str(status)).inc()
            metrics.API_REQUEST_SECONDS.observe(time.perf_counter() - t0)


def create_api(ranker: Ranker, settings: Settings) -> web.Application:
    """The API as an aiohttp application (testable with aiohttp's test client)."""
    api = web.Application(middlewares=[_measured])
    api[RANKER_KEY] = ranker
    api[SETTINGS_KEY] = settings
    api.router.add_get("/v1/recommendations/{user_id}", recommendations, name="recommendations")
    api.router.add_get("/healthz", healthz, name="healthz")
    api.router.add_get("/readyz", readyz, name="readyz")
    return api


def register(app: "DriftrecApp", ranker: Ranker) -> None:
    """Serve the API as a task of the worker (started with it, stopped with it)."""
    settings = app.settings
    if not settings.api.enabled:
        return

    async def serve_api() -> None:
        runner = web.AppRunner(create_api(ranker, settings), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.api.host, settings.api.port)
        await site.start()
        port = runner.addresses[0][1]
        # Read by tests and the demo: where this worker answers synchronous requests.
        print(f"driftrec worker: api on {settings.api.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()  # until the worker stops (the task is cancelled)
        finally:
            await runner.cleanup()

    app.task(serve_api)
