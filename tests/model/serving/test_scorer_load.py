"""Load test: ~200 requests/s for 20 s (longer on a slow CPU, see below) over HTTP while 100 adapter
swaps happen (3 checkpoints).

Every response must succeed and its scores must equal the reference scores of the adapter version it
reports (a response mixing two adapters, e.g. a user vector from one and item vectors from another,
would match no reference). The load comes from a separate process (``tests/scorer_loadgen.py``), as
real clients would. The serving dtype is the device default (bf16 on a bf16-capable CPU), so
references are computed by the scorer's own snapshot of each version on one text at a time, and the
comparison allows for bf16 batch/padding noise (measured up to 0.058 on a Xeon with AMX, where a short
history is padded inside a batch of longer ones), far below the gap between adapters (0.57 to 1.6, checked
before the run: every pair of versions must differ by more than 4 x TOL for every user).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from driftrec.model.catalogue import Catalogue
from driftrec.model.serving.scorer import LMScorer
from driftrec.model.serving.server import BATCHER_KEY, create_app
from tests.scorer_support import ADMIN_TOKEN, base_model_and_tokenizer, context, make_adapter, make_items, make_settings

RATE = int(os.environ.get("DRIFTREC_LOAD_RATE", 200))  # requests per second
DURATION_S = float(os.environ.get("DRIFTREC_LOAD_SECONDS", 20))
SWAPS = int(os.environ.get("DRIFTREC_LOAD_SWAPS", 100))  # issue 9 asks for 100 hot-swaps under load
SWAP_SHARE = 0.6  # at most this share of the run's time goes to swap work (measured before the run)
VERSIONS = ["v1", "v2", "v3"]
# 32 distinct users, 1-4 history items each. Every swap starts a fresh snapshot whose user-vector
# cache is empty, so each user needs a new LM forward after each swap (~1,600 forwards in the run).
def _users(n: int = 32) -> list[tuple[str, ...]]:
    rng = random.Random(7)
    users: dict[tuple[str, ...], None] = {}
    while len(users) < n:
        users[tuple(f"i{k}" for k in rng.sample(range(12), 1 + rng.randrange(4)))] = None
    return list(users)


USERS = _users()
CANDS = [f"i{k}" for k in range(12, 40)]
TOL = 0.1


@pytest.mark.slow
@pytest.mark.faults  # issue 9 fault suite
async def test_load_with_hot_swaps(tmp_path):
    model, tok = base_model_and_tokenizer()
    adir = tmp_path / "adapters"
    for n, v in enumerate(VERSIONS):
        make_adapter(model, adir, "default", v, seed=10 + n)
    settings = make_settings(adir)
    settings.model.dtype = "auto"  # serve as in production (bf16 where the CPU supports it)
    scorer = LMScorer(settings, Catalogue(make_items(40)), base_model=model, tokenizer=tok, torch_threads=1)
    scorer.start()

    contexts = [context(user=f"u{u}", history=h) for u, h in enumerate(USERS)]
    assert len({scorer.user_text(c) for c in contexts}) == len(USERS)
    refs: dict[tuple[str, int], list[float]] = {}
    for v in VERSIONS:
        scorer.activate("default", v, source="test")
        for u, ctx in enumerate(contexts):
            refs[(v, u)] = list(scorer.score(ctx, CANDS).scores)
    for u in range(len(USERS)):
        for a, b in itertools.combinations(VERSIONS, 2):
            gap = max(abs(x - y) for x, y in zip(refs[(a, u)], refs[(b, u)]))
            assert gap > 4 * TOL, (a, b, gap)  # adapters are far apart: a mixed answer cannot pass

    # What one swap costs on this machine: a new snapshot and the 32 user vectors it must recompute
    # (batched, as the server does). The run is stretched so that swap work takes at most SWAP_SHARE
    # of its time: 20 s where the CPU has native bf16, longer on an AVX2-only CPU in float32.
    t0 = time.perf_counter()
    snap = scorer.activate("default", VERSIONS[0], source="test")
    scorer.embed_users(snap, [scorer.user_text(c, snap) for c in contexts])
    swap_s = time.perf_counter() - t0
    duration = max(DURATION_S, SWAPS * swap_s / SWAP_SHARE)

    app = create_app(settings, scorer, watch=False, max_batch=64, max_queue=2000)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = {
        "url": f"http://127.0.0.1:{port}",
        "rate": RATE,
        "duration_s": duration,
        "swaps": SWAPS,
        "versions": VERSIONS,
        "admin_token": ADMIN_TOKEN,
        "payloads": [
            {"user_id": c.user_id, "history": [{"item_id": e.item_id, "rating": e.rating} for e in c.history],
             "candidates": CANDS}
            for c in contexts
        ],
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.scorer_loadgen",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[3]),
    )
    stdout, _ = await proc.communicate(json.dumps(config).encode())
    batcher = app[BATCHER_KEY]
    batches, batched = batcher.batches, batcher.items
    await runner.cleanup()
    scorer.close()
    assert proc.returncode == 0
    res = json.loads(stdout)

    mixed = []
    versions: dict[str, int] = {}
    for idx, _status, version, scores in res["responses"]:
        versions[version] = versions.get(version, 0) + 1
        ref = refs.get((version, idx))
        if ref is None or len(ref) != len(scores) or max(abs(a - b) for a, b in zip(scores, ref)) > TOL:
            diffs = {v: round(max(abs(a - b) for a, b in zip(scores, refs[(v, idx)])), 4) for v in VERSIONS}
            mixed.append((version, idx, diffs))
    lat = sorted(res["latencies"])
    total = int(RATE * duration)
    print(
        f"\nswap cost {swap_s * 1e3:.0f} ms, load: {total} requests in {res['elapsed']:.1f}s ({total / res['elapsed']:.0f}/s), swaps={res['swaps']}, "
        f"versions={versions}, p50={lat[len(lat) // 2] * 1e3:.1f}ms p99={lat[int(0.99 * (len(lat) - 1))] * 1e3:.1f}ms, "
        f"forwards={batched} in {batches} batches, failed={len(res['errors'])} mixed={len(mixed)}"
    )
    print("mixed:", mixed[:5], "errors:", res["errors"][:3])
    assert mixed == [], mixed[:5]
    assert res["errors"] == [], res["errors"][:5]
    assert res["swaps"] == SWAPS and res["swap_errors"] == []
    assert len(res["responses"]) == total
    assert set(versions) == set(VERSIONS)
    # the offered load was sustained (loose: the 2-core CI box is shared with other work)
    assert res["elapsed"] < duration * 2
