"""The base install is the app teams' client: installed alone in a fresh venv (no Faust, torch, Feast,
numpy), it produces through kafka-python (``Producer``) and aiokafka (``AsyncProducer``) and subscribes
both ways (``subscribe_sync``, ``subscribe``) against a real embedded broker; what it writes is what
the worker's own contracts write, and ``import model`` finds nothing of driftrec.

The venv is built from a copy of the package sources with ``pip install <copy>`` (the base
dependencies come from the package index, as an app team would get them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import env_for, produce_raw, read_json_topic

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "driftrec", "streams", "model", "feature_store", "bench")

APP = r'''
import asyncio, importlib.util, json, sys

heavy = ["faust", "torch", "feast", "transformers", "peft", "river", "numpy", "pandas", "model", "streams",
         "feature_store", "bench"]
present = [m for m in heavy if importlib.util.find_spec(m) is not None]

from driftrec.client import AsyncProducer, EventError, Producer, subscribe, subscribe_sync
from driftrec.core.contracts import Click, Recommendation, RecommendedItem
from driftrec.core.settings import Settings

s = Settings.load()
with Producer(s) as p:                                  # kafka-python
    ids = [p.click("slim-u", "m1"), p.rating("slim-u", "m2", 4.0)]
    try:
        p.rating("slim-u", "m3", 9.0)                   # out of range: refused before sending
        refused = None
    except EventError as exc:
        refused = str(exc)


async def produce_async():
    async with AsyncProducer(s) as ap:                  # aiokafka
        return await ap.request("slim-u", k=3)

ids.append(asyncio.run(produce_async()))

blocking = [r["request_id"] for r in subscribe_sync(s, user_id="slim-u", from_beginning=True, timeout_s=5)]


async def read_async():
    out = []

    async def read():
        async for rec in subscribe(s, user_id="slim-u", from_beginning=True):
            out.append(rec["request_id"])
            if len(out) == 2:
                return

    await asyncio.wait_for(read(), 30)
    return out

wire = Recommendation(event_id="r1", event_time=1.0, request_id="q1", user_id="u",
                      items=[RecommendedItem(item_id="m1", score=0.5)]).to_wire()
print(json.dumps({"present": present, "ids": ids, "refused": refused, "blocking": blocking,
                  "async": asyncio.run(read_async()), "click": Click(event_id="c1", event_time=2.0, user_id="u",
                                                                     item_id="i").to_wire(), "wire": wire}))
'''


@pytest.fixture(scope="module")
def slim_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slim")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, env=env, timeout=540)
    if done.returncode != 0:
        pytest.fail(f"pip install of the base package failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return py


@pytest.mark.timeout(900)
def test_the_base_install_produces_and_subscribes_both_ways_without_the_ml_stack(kafka, slim_python, tmp_path):
    from driftrec.core.contracts import Click, Recommendation, RecommendedItem

    bootstrap, settings = kafka
    t = settings.topics
    recs = [json.dumps({"type": "recommendation", "event_id": f"r{n}", "event_time": 1.0, "request_id": f"q{n}",
                        "user_id": "slim-u", "items": [{"item_id": "m1", "score": 1.0, "reason": ""}]}).encode()
            for n in range(2)]
    produce_raw(bootstrap, [(t.recommendations.name, b"slim-u", v) for v in recs])

    env = {k: v for k, v in env_for(settings).items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    app = tmp_path / "app.py"
    app.write_text(APP)
    done = subprocess.run([str(slim_python), str(app)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["present"] == []  # neither the ML stack nor a top-level `model`/`streams` package
    assert "rating" in out["refused"]
    assert out["blocking"] == ["q0", "q1"] and out["async"] == ["q0", "q1"]
    # the events arrived, keyed and shaped as the worker reads them
    clicks = read_json_topic(bootstrap, t.clicks.name, min_count=1)
    ratings = read_json_topic(bootstrap, t.ratings.name, min_count=1)
    requests = read_json_topic(bootstrap, t.requests.name, min_count=1)
    assert [e["event_id"] for e in clicks] == [out["ids"][0]] and clicks[0]["item_id"] == "m1"
    assert [e["event_id"] for e in ratings] == [out["ids"][1]] and ratings[0]["rating"] == 4.0
    assert [e["event_id"] for e in requests] == [out["ids"][2]] and requests[0]["k"] == 3
    # the client's contracts (no Faust) write what the worker's (faust.Record) write
    assert out["click"] == Click(event_id="c1", event_time=2.0, user_id="u", item_id="i").to_wire()
    assert out["wire"] == Recommendation(event_id="r1", event_time=1.0, request_id="q1", user_id="u",
                                         items=[RecommendedItem(item_id="m1", score=0.5)]).to_wire()
