"""The scorer's HTTP API: endpoints, validation, admin auth, limits, hot swap via HTTP."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from driftrec.core.validation import MAX_ID_LEN
from driftrec.model.catalogue import Catalogue
from driftrec.model.serving.scorer import LMScorer
from driftrec.model.serving.server import create_app
from tests.scorer_support import (
    ADMIN_TOKEN,
    base_model_and_tokenizer,
    context,
    make_adapter,
    make_items,
    make_settings,
    reference_scores,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CANDS = [f"i{k}" for k in range(5, 25)]


@pytest.fixture(scope="module")
def base():
    return base_model_and_tokenizer()


@pytest.fixture()
def setup(base, tmp_path):
    model, tok = base
    adir = tmp_path / "adapters"
    _, pm1 = make_adapter(model, adir, "default", "v1", seed=1)
    _, pm2 = make_adapter(model, adir, "default", "v2", seed=2)
    items = make_items(30)
    settings = make_settings(adir)
    scorer = LMScorer(settings, Catalogue(items), base_model=model, tokenizer=tok)
    scorer.registry.mark_active("default", "v1")
    yield settings, scorer, items, {"v1": pm1, "v2": pm2}, tok
    scorer.close()


async def _client(settings, scorer, **kw) -> TestClient:
    client = TestClient(TestServer(create_app(settings, scorer, watch=False, **kw)))
    await client.start_server()
    for _ in range(300):  # the app starts the scorer (initial snapshots) in the background
        resp = await client.get("/readyz")
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    return client


async def test_recommend_score_and_swap(setup):
    settings, scorer, items, pms, tok = setup
    client = await _client(settings, scorer)
    try:
        assert (await client.get("/healthz")).status == 200
        ready = await (await client.get("/readyz")).json()
        assert ready == {"ready": True, "domains": {"default": "v1"}}
        ctx = context()
        history = [{"item_id": "i1", "rating": 4.0}, "i2", {"item_id": "i3", "rating": 4}]
        resp = await client.post("/v1/score", json={"history": history, "candidates": CANDS})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["adapter_version"] == "v1" and body["model_version"] == scorer.model_version
        ref = reference_scores(pms["v1"], tok, items, ctx, CANDS)
        assert [s["item_id"] for s in body["scores"]] == CANDS
        assert max(abs(s["score"] - ref[s["item_id"]]) for s in body["scores"]) < 2e-4

        resp = await client.post(
            "/v1/recommend", json={"user_id": "u1", "k": 5, "history": history, "exclude": ["i0"]}
        )
        body = await resp.json()
        assert resp.status == 200 and len(body["items"]) == 5 and body["adapter_version"] == "v1"
        ids = [it["item_id"] for it in body["items"]]
        assert not {"i0", "i1", "i2", "i3"} & set(ids)  # excluded + already seen
        full = sorted(
            ((i, s) for i, s in reference_scores(pms["v1"], tok, items, ctx, [it.item_id for it in items]).items()
             if i not in {"i0", "i1", "i2", "i3"}), key=lambda t: -t[1]
        )
        assert ids == [i for i, _ in full[:5]]
        assert all(it["reason"] for it in body["items"])

        resp = await client.post("/v1/adapters/default/activate", json={"version": "v2"}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        body = await (await client.post("/v1/score", json={"history": history, "candidates": CANDS})).json()
        ref2 = reference_scores(pms["v2"], tok, items, ctx, CANDS)
        assert body["adapter_version"] == "v2"
        assert max(abs(s["score"] - ref2[s["item_id"]]) for s in body["scores"]) < 2e-4

        listing = await (await client.get("/v1/adapters")).json()
        dom = listing["domains"]["default"]
        assert dom["serving"] == "v2" and dom["active"] == "v2" and dom["previous"] == "v1"
        assert [v["version"] for v in dom["versions"]] == ["v1", "v2"]

        resp = await client.post("/v1/adapters/default/rollback", headers=ADMIN)
        assert resp.status == 200 and (await resp.json())["adapter_version"] == "v1"
        resp = await client.post("/v1/adapters/default/rollback", headers=ADMIN)
        assert resp.status == 409  # nothing left to roll back to
        resp = await client.post("/v1/adapters/default/activate", json={"version": "v7"}, headers=ADMIN)
        assert resp.status == 404
        adir = settings.model.adapter_dir
        with open(adir / "default" / "v2" / "adapter_model.safetensors", "r+b") as fh:  # altered after its manifest
            fh.seek(-1, 2)
            last = fh.read(1)
            fh.seek(-1, 2)
            fh.write(bytes([last[0] ^ 0xFF]))
        resp = await client.post("/v1/adapters/default/activate", json={"version": "v2"}, headers=ADMIN)
        assert resp.status == 422 and (await resp.json())["reason"] == "checksum"
        listing = await (await client.get("/v1/adapters")).json()
        assert listing["domains"]["default"]["serving"] == "v1"  # the old one keeps serving
        rejected = listing["rejected"][-1]
        assert (rejected["version"], rejected["reason"]) == ("v2", "checksum")
        assert "<adapter_dir>/default/v2" in rejected["error"] and str(adir.parent) not in json.dumps(listing)

        metrics_text = await (await client.get("/metrics")).text()
        assert "driftrec_scoring_latency_seconds_bucket" in metrics_text
        assert 'driftrec_scorer_requests_total{endpoint="score",status="200"}' in metrics_text
    finally:
        await client.close()


@pytest.mark.faults  # issue 9 fault suite
async def test_admin_auth(setup):
    settings, scorer, *_ = setup
    client = await _client(settings, scorer)
    try:
        url = "/v1/adapters/default/activate"
        resp = await client.post(url, json={"version": "v2"})
        assert resp.status == 401 and resp.headers.get("WWW-Authenticate") == "Bearer"
        resp = await client.post(url, json={"version": "v2"}, headers={"Authorization": "Bearer nope"})
        assert resp.status == 403
        resp = await client.post("/v1/adapters/default/rollback", headers={"Authorization": "Basic abc"})
        assert resp.status == 401
        resp = await client.post("/v1/items", json={"items": [{"item_id": "x", "title": "X"}]})
        assert resp.status == 401
        assert scorer.snapshot().adapter_version == "v1"
    finally:
        await client.close()
    settings.scorer.admin_token = None  # admin disabled
    client = await _client(settings, scorer)
    try:
        resp = await client.post("/v1/adapters/default/activate", json={"version": "v2"}, headers=ADMIN)
        assert resp.status == 403 and "disabled" in (await resp.json())["error"]
    finally:
        await client.close()


@pytest.mark.faults  # issue 9 fault suite
async def test_validation_errors(setup):
    settings, scorer, *_ = setup
    settings.scorer.max_request_bytes = 4096
    settings.scorer.max_candidates = 50
    client = await _client(settings, scorer)
    try:
        async def post(path, data, status, fragment):
            if isinstance(data, (dict, list)):
                resp = await client.post(path, json=data)
            else:
                resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
            assert resp.status == status, (path, data, await resp.text())
            body = await resp.json()
            assert fragment in body["error"], body
            return body

        await post("/v1/recommend", b"{not json", 400, "not valid JSON")
        await post("/v1/recommend", b"", 400, "empty")
        await post("/v1/recommend", [1, 2], 400, "JSON object")
        await post("/v1/recommend", {"k": 3}, 400, "user_id")
        await post("/v1/recommend", {"user_id": "u", "k": 0}, 400, "k must be")
        await post("/v1/recommend", {"user_id": "u", "k": 1000}, 400, "k must be")
        await post("/v1/recommend", {"user_id": "u", "k": "3"}, 400, "k must be")
        await post("/v1/recommend", {"user_id": "u", "candidates": "i1"}, 400, "candidates")
        await post("/v1/recommend", {"user_id": "u", "candidates": [f"i{k}" for k in range(51)]}, 400, "too many")
        await post("/v1/recommend", {"user_id": "u", "domain": "nowhere"}, 400, "unknown domain")
        await post("/v1/recommend", {"user_id": "u", "domain": "../x"}, 400, "invalid domain")
        await post("/v1/recommend", {"user_id": "u", "history": [{"rating": 3}]}, 400, "history[0]")
        await post("/v1/recommend", {"user_id": "u", "history": [{"item_id": "i1", "rating": 9}]}, 400, "rating")
        await post("/v1/score", {"history": ["i1"]}, 400, "candidates")
        # ids: the same limit as inbound events (driftrec.core.validation.MAX_ID_LEN)
        await post("/v1/recommend", {"user_id": "u" * (MAX_ID_LEN + 1)}, 400, "user_id")
        await post("/v1/recommend", {"user_id": "u", "domain": "d" * (MAX_ID_LEN + 1)}, 400, "domain")
        await post("/v1/recommend", {"user_id": "u", "text": "x" * 5000}, 413, "exceeds")
        big = json.dumps({"user_id": "u", "candidates": ["i1"] * 2000}).encode()
        await post("/v1/score", big, 413, "exceeds")
        resp = await client.get("/nope")
        assert resp.status == 404
        # unknown candidates are reported, not fatal
        body = await (await client.post("/v1/score", json={"candidates": ["i1", "zz"]})).json()
        assert body["unknown"] == ["zz"] and [s["item_id"] for s in body["scores"]] == ["i1"]
    finally:
        await client.close()


async def test_items_upsert_and_queue_full(setup):
    settings, scorer, items, pms, tok = setup
    client = await _client(settings, scorer, max_queue=1, max_batch=1)
    try:
        new = {"item_id": "n1", "title": "Iron Summer", "genres": ["action"], "year": 1999}
        resp = await client.post("/v1/items", json={"items": [new]}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        resp = await client.post("/v1/items", json={"items": [{"item_id": "n2"}]}, headers=ADMIN)
        assert resp.status == 400 and "title" in (await resp.json())["error"]
        too_long = {"item_id": "n" * (MAX_ID_LEN + 1), "title": "Too Long"}
        resp = await client.post("/v1/items", json={"items": [too_long]}, headers=ADMIN)
        assert resp.status == 400 and f"at most {MAX_ID_LEN}" in (await resp.json())["error"]
        longest = {"item_id": "n" * MAX_ID_LEN, "title": "Just Fits"}
        resp = await client.post("/v1/items", json={"items": [longest]}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        body = await (await client.post("/v1/recommend", json={"user_id": "u", "candidates": ["n1", "i4"], "k": 2})).json()
        assert {it["item_id"] for it in body["items"]} == {"n1", "i4"}
        for _ in range(100):
            if "n1" in scorer.snapshot().index:
                break
            await asyncio.sleep(0.05)
        assert "n1" in scorer.snapshot().index  # refreshed in the background
        # a burst larger than the queue: some requests are shed with 503, none fail otherwise
        resps = await asyncio.gather(
            *(client.post("/v1/score", json={"history": [f"i{k}"], "candidates": CANDS}) for k in range(12))
        )
        statuses = [r.status for r in resps]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    finally:
        await client.close()


async def test_any_scorer_behind_the_seam(tmp_path):
    """The server works with any :class:`driftrec.model.base.Scorer` (here a test double without adapters)."""
    from driftrec.model.base import Scorer, ScoreResult, VersionInfo

    class Fixed(Scorer):
        def score(self, context, item_ids=None):
            ids = tuple(item_ids or ("a", "b", "c"))
            return ScoreResult(ids, tuple(float(len(i)) for i in ids), "default", "fixed", "fake@1")

        def version_info(self, domain=None):
            return VersionInfo("default", "fake@1", "fixed")

    settings = make_settings(tmp_path / "adapters")
    client = TestClient(TestServer(create_app(settings, Fixed(), watch=False)))
    await client.start_server()
    try:
        assert (await client.get("/readyz")).status == 200
        body = await (await client.post("/v1/recommend", json={"user_id": "u", "k": 2, "candidates": ["x", "yyy", "zz"]})).json()
        assert [it["item_id"] for it in body["items"]] == ["yyy", "zz"] and body["adapter_version"] == "fixed"
        resp = await client.post("/v1/adapters/default/activate", json={"version": "v1"}, headers=ADMIN)
        assert resp.status == 501
        assert (await (await client.get("/v1/adapters")).json())["domains"]["default"]["serving"] == "fixed"
    finally:
        await client.close()
