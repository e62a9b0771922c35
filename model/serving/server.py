"""The scorer worker's HTTP API (aiohttp).

Endpoints
---------
* ``POST /v1/recommend`` - ``{"user_id", "k"?, "candidates"?, "history"?, "text"?, "domain"?,
  "exclude"?, "exclude_seen"?}`` -> ranked ``items`` (item_id, score, reason), ``adapter_version``,
  ``model_version``, ``domain``, ``unknown`` (candidate ids not in the catalogue). Without
  ``candidates`` the whole domain catalogue is ranked. History items are excluded unless
  ``exclude_seen`` is false.
* ``POST /v1/score`` - ``{"candidates", "history"?, "text"?, "user_id"?, "domain"?}`` -> ``scores``
  (one per known candidate, in request order) + versions.
* ``GET /v1/adapters`` - per domain: serving/active/previous version, versions on disk, recent rejections.
* ``POST /v1/adapters/{domain}/activate`` ``{"version"}`` and ``POST /v1/adapters/{domain}/rollback``
  - admin (``Authorization: Bearer <scorer.admin_token>``; 401 without, 403 wrong; 403 when no
  token is configured: admin disabled).
* ``POST /v1/items`` - upsert catalogue items (``{"items": [...]}``). Admin too: it changes what every
  user is recommended, so it must not be open to anyone who can reach the scoring port. Inside one
  process, feed ``scorer.catalogue.upsert(...)`` directly (no token needed).
* ``GET /healthz`` (process alive), ``GET /readyz`` (200 once the default domain has a snapshot),
  ``GET /metrics`` (Prometheus exposition).

Errors are JSON ``{"error": "..."}``: 400 for bad JSON / types / bounds / unknown domain, 413 for a body
over ``scorer.max_request_bytes``, 503 while not ready or when the scoring queue is full.

Model forwards run on one dedicated thread behind a :class:`driftrec.model.serving.batcher.MicroBatcher`, keyed by
snapshot (a batch never mixes adapters). Snapshot builds (adapter swaps, catalogue refreshes) run on
the scorer's own builder thread, so they never block the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from driftrec.core import metrics
from driftrec.core.validation import MAX_ID_LEN
from driftrec.model.adapters import CheckpointError, valid_name
from driftrec.model.base import Scorer, ScoreResult, UserContext
from driftrec.model.serving.batcher import MicroBatcher, QueueFull
from driftrec.model.catalogue import Catalogue, item_from_dict
from driftrec.model.serving.scorer import LMScorer, history_from_json

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("driftrec_settings", object)
SCORER_KEY = web.AppKey("driftrec_scorer", Scorer)
BATCHER_KEY = web.AppKey("driftrec_batcher", MicroBatcher)
EXECUTOR_KEY = web.AppKey("driftrec_score_executor", ThreadPoolExecutor)
TASKS_KEY = web.AppKey("driftrec_tasks", list)
OPTIONS_KEY = web.AppKey("driftrec_options", dict)
INFLIGHT_KEY = web.AppKey("driftrec_inflight", dict)

MAX_ITEMS_PER_UPSERT = 10_000
MAX_TEXT_CHARS = 2_000


class BadRequest(Exception):
    pass


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# ------------------------------------------------------------------------------ middleware


@web.middleware
async def _observe(request: web.Request, handler):
    route = request.match_info.route
    endpoint = getattr(route, "name", None) or "unmatched"
    try:
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        response = _error(413, f"request body exceeds {request.app[SETTINGS_KEY].scorer.max_request_bytes} bytes")
    except BadRequest as exc:
        response = _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.text and exc.text.startswith("{"):
            keep = {k: v for k, v in exc.headers.items() if k.lower() in ("www-authenticate", "retry-after")}
            response = web.Response(status=exc.status, text=exc.text, content_type="application/json", headers=keep)
        else:
            response = _error(exc.status, exc.reason)
    except Exception:  # noqa: BLE001
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = _error(500, "internal error")
    metrics.SCORER_REQUESTS.labels(endpoint=endpoint, status=str(response.status)).inc()
    return response


# ------------------------------------------------------------------------------ validation


async def _json_body(request: web.Request) -> dict[str, Any]:
    limit = request.app[SETTINGS_KEY].scorer.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _opt_str(body: dict, name: str, max_len: int = MAX_ID_LEN) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise BadRequest(f"{name} must be a non-empty string of at most {max_len} characters")
    return value


def _id_list(body: dict, name: str, limit: int) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{name} must be a list of non-empty item id strings")
    if len(value) > limit:
        raise BadRequest(f"too many {name}: {len(value)} > {limit}")
    return value


def _domain(app: web.Application, body: dict) -> str:
    scorer = app[SCORER_KEY]
    domain = _opt_str(body, "domain") or app[SETTINGS_KEY].model.default_domain
    if not valid_name(domain):
        raise BadRequest(f"invalid domain {domain!r}")
    if isinstance(scorer, LMScorer) and scorer.snapshot(domain) is None:
        raise BadRequest(f"unknown domain {domain!r}")
    return domain


def _context(app: web.Application, body: dict, *, user_required: bool) -> UserContext:
    user_id = _opt_str(body, "user_id")
    if user_required and user_id is None:
        raise BadRequest("user_id is required (a non-empty string)")
    try:
        history = history_from_json(body.get("history"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if len(history) > app[SETTINGS_KEY].scorer.max_candidates:
        raise BadRequest("history is too long")
    text = body.get("text")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT_CHARS):
        raise BadRequest(f"text must be a string of at most {MAX_TEXT_CHARS} characters")
    return UserContext(user_id=user_id or "", history=history, text=text, domain=_domain(app, body))


def _check_admin(request: web.Request) -> None:
    secret = request.app[SETTINGS_KEY].scorer.admin_token
    token = secret.get_secret_value() if secret is not None else ""
    if not token:
        raise web.HTTPForbidden(
            text=json.dumps({"error": "admin endpoints are disabled: no scorer.admin_token configured"}),
            content_type="application/json",
        )
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "missing admin token (Authorization: Bearer <token>)"}),
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        raise web.HTTPForbidden(text=json.dumps({"error": "wrong admin token"}), content_type="application/json")


# ------------------------------------------------------------------------------ scoring


async def _score(
    app: web.Application, ctx: UserContext, candidates: list[str] | None, *, with_reasons: bool = True
) -> ScoreResult:
    scorer = app[SCORER_KEY]
    if not isinstance(scorer, LMScorer):
        return await scorer.score_async(ctx, candidates)
    snap = scorer.snapshot(ctx.domain)  # taken once: everything below uses this snapshot only
    if snap is None:
        raise web.HTTPServiceUnavailable(text=json.dumps({"error": "scorer not ready"}), content_type="application/json")
    t0 = time.perf_counter()
    text = scorer.user_text(ctx, snap)
    try:
        user_vec = snap.user_cache.get(text)
        if user_vec is None:
            # single flight: concurrent requests for the same text on the same snapshot share one forward
            inflight = app[INFLIGHT_KEY]
            key = (snap, text)
            task = inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(app[BATCHER_KEY].submit(snap, text))
                inflight[key] = task
                task.add_done_callback(lambda _t, key=key: inflight.pop(key, None))
            user_vec = await asyncio.shield(task)
    except QueueFull as exc:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": str(exc)}), content_type="application/json", headers={"Retry-After": "1"}
        ) from None
    call = functools.partial(scorer.score_vector, snap, ctx, user_vec, candidates, with_reasons=with_reasons)
    if candidates is not None and snap.missing(candidates):
        result = await asyncio.get_running_loop().run_in_executor(app[EXECUTOR_KEY], call)
    else:
        result = call()
    metrics.SCORING_LATENCY_SECONDS.labels(domain=snap.domain).observe(time.perf_counter() - t0)
    return result


async def recommend(request: web.Request) -> web.Response:
    app = request.app
    st = app[SETTINGS_KEY].scorer
    body = await _json_body(request)
    ctx = _context(app, body, user_required=True)
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= st.max_k:
        raise BadRequest(f"k must be an integer in [1, {st.max_k}]")
    candidates = _id_list(body, "candidates", st.max_candidates)
    exclude = set(_id_list(body, "exclude", st.max_candidates) or ())
    exclude_seen = body.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise BadRequest("exclude_seen must be a boolean")
    if exclude_seen:
        exclude.update(e.item_id for e in ctx.history)
    result = await _score(app, ctx, candidates)
    items = [
        {"item_id": i, "score": round(s, 6), "reason": r}
        for i, s, r in result.top(k, exclude)
    ]
    return web.json_response(
        {
            "user_id": ctx.user_id,
            "domain": result.domain,
            "items": items,
            "adapter_version": result.adapter_version,
            "model_version": result.model_version,
            "unknown": list(result.unknown),
        }
    )


async def score(request: web.Request) -> web.Response:
    app = request.app
    st = app[SETTINGS_KEY].scorer
    body = await _json_body(request)
    ctx = _context(app, body, user_required=False)
    candidates = _id_list(body, "candidates", st.max_candidates)
    if not candidates:
        raise BadRequest("candidates must be a non-empty list of item ids")
    result = await _score(app, ctx, candidates, with_reasons=False)
    return web.json_response(
        {
            "user_id": ctx.user_id,
            "domain": result.domain,
            "scores": [{"item_id": i, "score": s} for i, s in zip(result.item_ids, result.scores)],
            "adapter_version": result.adapter_version,
            "model_version": result.model_version,
            "unknown": list(result.unknown),
        }
    )


# ------------------------------------------------------------------------------ admin


def _lm(app: web.Application) -> LMScorer:
    scorer = app[SCORER_KEY]
    if not isinstance(scorer, LMScorer):
        raise web.HTTPNotImplemented(text=json.dumps({"error": "this scorer has no adapters"}), content_type="application/json")
    return scorer


def _path_domain(request: web.Request) -> str:
    domain = request.match_info["domain"]
    if not valid_name(domain):
        raise BadRequest(f"invalid domain {domain!r}")
    return domain


async def list_adapters(request: web.Request) -> web.Response:
    scorer = request.app[SCORER_KEY]
    if isinstance(scorer, LMScorer):  # reads every manifest on disk: not on the event loop
        return web.json_response(await asyncio.to_thread(scorer.adapters_status))
    info = scorer.version_info()
    return web.json_response({"model_version": info.model_version, "domains": {info.domain: {"serving": info.adapter_version}}})


async def activate(request: web.Request) -> web.Response:
    _check_admin(request)
    domain = _path_domain(request)
    body = await _json_body(request)
    version = body.get("version")
    if not isinstance(version, str) or not valid_name(version):
        raise BadRequest("version must be a version name (letters, digits, '.', '_', '-')")
    scorer = _lm(request.app)
    try:
        snap = await scorer.run_in_builder(functools.partial(scorer.activate, domain, version, source="admin"))
    except LookupError as exc:
        return _error(404, str(exc))
    except CheckpointError as exc:
        return _error(422, f"checkpoint rejected: {exc}", reason=exc.reason)
    return web.json_response(
        {"domain": domain, "adapter_version": snap.adapter_version, "model_version": snap.model_version,
         "items": len(snap.item_ids)}
    )


async def rollback(request: web.Request) -> web.Response:
    _check_admin(request)
    domain = _path_domain(request)
    scorer = _lm(request.app)
    try:
        snap = await scorer.run_in_builder(functools.partial(scorer.rollback, domain, source="admin"))
    except LookupError as exc:
        return _error(409, str(exc))
    except CheckpointError as exc:
        return _error(422, f"rollback target rejected: {exc}", reason=exc.reason)
    return web.json_response(
        {"domain": domain, "adapter_version": snap.adapter_version, "model_version": snap.model_version}
    )


async def upsert_items(request: web.Request) -> web.Response:
    _check_admin(request)
    body = await _json_body(request)
    rows = body.get("items")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("items must be a non-empty list of item objects")
    if len(rows) > MAX_ITEMS_PER_UPSERT:
        raise BadRequest(f"too many items: {len(rows)} > {MAX_ITEMS_PER_UPSERT}")
    scorer = _lm(request.app)
    try:
        items = [item_from_dict(r, scorer.default_domain) for r in rows]
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    bad = sorted({it.domain for it in items if not valid_name(it.domain)})
    if bad:
        raise BadRequest(f"invalid item domain(s) {bad}")
    changed = scorer.catalogue.upsert(items)
    if changed:  # re-embed in the background; meanwhile new items are embedded on demand
        task = asyncio.get_running_loop().create_task(scorer.run_in_builder(scorer.refresh_items))
        request.app[TASKS_KEY].append(task)
        task.add_done_callback(lambda t: t in request.app[TASKS_KEY] and request.app[TASKS_KEY].remove(t))
    return web.json_response({"upserted": len(items), "catalogue_versions": changed})


# ------------------------------------------------------------------------------ health


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    scorer = request.app[SCORER_KEY]
    if not scorer.ready():
        return web.json_response({"ready": False}, status=503)
    domains = {}
    if isinstance(scorer, LMScorer):
        domains = {d: s.adapter_version for d, s in scorer._snapshots.items()}
    return web.json_response({"ready": True, "domains": domains})


# ------------------------------------------------------------------------------ app


def create_app(
    settings: Any,
    scorer: Scorer | None = None,
    *,
    catalogue: Catalogue | None = None,
    watch: bool = True,
    max_batch: int = 32,
    max_queue: int = 256,
    consume_announcements: bool = False,
) -> web.Application:
    """The scorer's aiohttp application.

    ``scorer`` defaults to :meth:`LMScorer.from_settings` (loads the base model). An LMScorer that has
    not been started is started (initial snapshots built) in the background; ``/readyz`` says when.
    ``watch`` polls ``settings.model.adapter_dir`` every ``scorer.watch_interval_s`` for new versions.
    ``consume_announcements`` also consumes the adapters topic (:mod:`driftrec.model.serving.announcements`).
    """
    owned = scorer is None
    if scorer is None:
        scorer = LMScorer.from_settings(settings, catalogue)
    app = web.Application(client_max_size=settings.scorer.max_request_bytes, middlewares=[_observe])
    app[SETTINGS_KEY] = settings
    app[SCORER_KEY] = scorer
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftrec-score")
    app[EXECUTOR_KEY] = executor
    app[TASKS_KEY] = []
    app[OPTIONS_KEY] = {"watch": watch, "owned": owned}
    app[INFLIGHT_KEY] = {}
    if isinstance(scorer, LMScorer):
        app[BATCHER_KEY] = MicroBatcher(
            scorer.embed_users, executor, max_batch=max_batch, max_queue=max_queue
        )

    r = app.router
    r.add_post("/v1/recommend", recommend, name="recommend")
    r.add_post("/v1/score", score, name="score")
    r.add_get("/v1/adapters", list_adapters, name="adapters")
    r.add_post("/v1/adapters/{domain}/activate", activate, name="activate")
    r.add_post("/v1/adapters/{domain}/rollback", rollback, name="rollback")
    r.add_post("/v1/items", upsert_items, name="items")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/readyz", readyz, name="readyz")
    r.add_get("/metrics", metrics.aiohttp_metrics_handler, name="metrics")

    async def on_startup(app: web.Application) -> None:
        if BATCHER_KEY in app:
            app[BATCHER_KEY].start()
        if isinstance(scorer, LMScorer):
            if not scorer._started:
                app[TASKS_KEY].append(asyncio.get_running_loop().create_task(scorer.run_in_builder(scorer.start)))
            if watch:
                app[TASKS_KEY].append(asyncio.get_running_loop().create_task(scorer.watch()))
            if consume_announcements:
                app[TASKS_KEY].append(asyncio.get_running_loop().create_task(_consume(settings, scorer)))

    async def on_cleanup(app: web.Application) -> None:
        for task in list(app[TASKS_KEY]):
            task.cancel()
        for task in list(app[TASKS_KEY]):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if BATCHER_KEY in app:
            await app[BATCHER_KEY].stop()
        executor.shutdown(wait=False, cancel_futures=True)
        if owned and isinstance(scorer, LMScorer):
            scorer.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def _consume(settings: Any, scorer: LMScorer) -> None:
    from driftrec.model.serving.announcements import consume_adapter_announcements

    try:
        await consume_adapter_announcements(settings, scorer)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the directory watcher keeps working without Kafka
        log.exception("adapters-topic consumer stopped; relying on the adapter directory watcher")


def run_scorer(
    settings: Any,
    *,
    catalogue_path: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    consume_announcements: bool | None = None,
) -> None:
    """Run the scorer worker until interrupted (what ``driftrec scorer`` calls).

    With a Kafka broker reachable (configured, or a running embedded one), the catalogue follows the
    items topic and adapter announcements are consumed (``consume_announcements=None`` = when a broker
    is reachable).

    Suggested CLI flags (the CLI maps them onto this call / onto settings):

    * ``--config PATH`` - YAML settings file (``Settings.load(config=...)``);
    * ``--host`` / ``--port`` - bind address (default ``scorer.host`` / ``scorer.port``);
    * ``--catalogue PATH`` - optional JSON-lines file of items to load before serving;
    * ``--model-path``, ``--adapter-dir``, ``--device``, ``--dtype`` - override ``model.*``;
    * ``--kafka-announcements`` - also consume the adapters topic (``consume_announcements=True``);
    * the admin token comes from ``DRIFTREC_SCORER__ADMIN_TOKEN`` (never a flag: it would leak
      into ``ps`` output).
    """
    logging.basicConfig(level=getattr(settings, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    catalogue = Catalogue(default_domain=settings.model.default_domain)
    if catalogue_path:
        changed = catalogue.load_jsonl(catalogue_path)
        log.info("loaded catalogue %s: %s", catalogue_path, changed)
    threads = max(1, (os.cpu_count() or 2) - 1)  # leave a core to the event loop
    scorer = LMScorer.from_settings(settings, catalogue, torch_threads=threads)
    log.info("scorer model %s on %s; adapters in %s", scorer.model_version, scorer.plan, scorer.adapter_dir)
    scorer.start()
    from driftrec.model.serving.feeds import attach_catalogue_feed, kafka_bootstrap

    metrics.prime(domains=(settings.model.default_domain,))
    bootstrap = kafka_bootstrap(settings)
    if consume_announcements is None:
        consume_announcements = bootstrap is not None
    app = create_app(settings, scorer, consume_announcements=consume_announcements)
    if bootstrap is not None:
        attach_catalogue_feed(app, settings, bootstrap, catalogue)
    web.run_app(
        app,
        host=host or settings.scorer.host,
        port=port if port is not None else settings.scorer.port,
        access_log=None,
        print=lambda *_: None,
    )
