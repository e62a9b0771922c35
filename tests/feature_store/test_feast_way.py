"""driftrec's features used the Feast way: the stream's writer appends what it writes online to the offline
store, so ``get_historical_features`` returns the values *as of* a timestamp; the repository folder is
a Feast repo for Feast's CLI (``feast plan`` sees no change, ``feast apply`` keeps every view) and
``feast serve`` - the HTTP feature server non-Python apps use - reads what the stream wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from driftrec.core.settings import Settings
from driftrec.feature_store.definitions import RANKING_SERVICE, USER_SERVICE
from driftrec.feature_store.offline import view_dir
from driftrec.feature_store.process import create_writer
from driftrec.feature_store.repo import open_store


def _settings(tmp_path, **feast) -> Settings:
    return Settings(feast={"repo_dir": str(tmp_path / "feast"), "project": f"t_{uuid.uuid4().hex[:12]}",
                           "offline_flush_s": 0.5, **feast})


def _user(uid, t, clicks, recent):
    return {"user_id": uid, "recent_items": json.dumps(recent), "click_count": clicks, "rating_count": 0,
            "mean_rating": 0.0, "last_event_time": t, "genre_profile": json.dumps({"Drama": 1.0})}


def _item(iid, t, clicks):
    return {"item_id": iid, "click_count": clicks, "rating_count": 0, "popularity_total": clicks,
            "popularity_decayed": float(clicks), "popularity_time": t, "mean_rating": 0.0, "last_event_time": t}


def _feast_cli() -> str:
    exe = Path(sys.executable).with_name("feast")
    return str(exe) if exe.exists() else shutil.which("feast") or "feast"


async def _write_history(settings, t0):
    """Three batches through the stream's writer process: u1 clicks at t0, t0+100, t0+200."""
    writer = create_writer(settings)
    async with writer:
        await writer.write_batch([_user("u1", t0, 1, ["a"]), _user("u2", t0, 1, ["b"])], [_item("a", t0, 1)])
        await writer.write_batch([_user("u1", t0 + 100, 2, ["b", "a"])], [_item("a", t0 + 100, 2)])
        await writer.write_batch([_user("u1", t0 + 200, 3, ["c", "b", "a"])], [])


async def test_historical_features_are_the_streams_values_as_of_each_timestamp(tmp_path):
    settings = _settings(tmp_path)
    t0 = time.time() - 3600
    await _write_history(settings, t0)  # closing the writer appends what it still buffered
    files = sorted(p.name for p in view_dir(settings.feast.repo_dir, "user_features").iterdir())
    assert files and all(f.startswith("part-") and f.endswith(".parquet") for f in files)

    fs = open_store(settings)
    ts = lambda s: pd.Timestamp(t0 + s, unit="s", tz="UTC")  # noqa: E731
    entity_df = pd.DataFrame({"user_id": ["u1", "u1", "u1", "u2"],
                              "event_timestamp": [ts(50), ts(150), ts(900), ts(900)]})
    out = fs.get_historical_features(entity_df=entity_df, features=fs.get_feature_service(USER_SERVICE)).to_df()
    out = out.sort_values(["user_id", "event_timestamp"]).reset_index(drop=True)
    assert out["click_count"].tolist() == [1, 2, 3, 1]  # u1 as of t0+50, t0+150, t0+900; u2 as of t0+900
    assert out["recent_items"].tolist() == ['["a"]', '["b", "a"]', '["c", "b", "a"]', '["b"]']
    assert out["last_event_time"].tolist() == pytest.approx([t0, t0 + 100, t0 + 200, t0])

    items = pd.DataFrame({"item_id": ["a", "a"], "event_timestamp": [ts(50), ts(150)]})
    got = fs.get_historical_features(entity_df=items, features=["item_features:popularity_total"]).to_df()
    assert sorted(got["popularity_total"].tolist()) == [1, 2]


async def test_an_idle_writer_appends_within_offline_flush_s(tmp_path):
    settings = _settings(tmp_path)
    writer = create_writer(settings)
    async with writer:
        await writer.write_batch([_user("u9", time.time(), 1, ["a"])], [])
        folder = view_dir(settings.feast.repo_dir, "user_features")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (folder.is_dir() and any(folder.glob("part-*.parquet"))):
            time.sleep(0.1)
        assert any(folder.glob("part-*.parquet")), "the writer kept the row buffered while idle"
        frame = pd.read_parquet(next(folder.glob("part-*.parquet")))
        assert frame["user_id"].tolist() == ["u9"] and str(frame["event_timestamp"].dt.tz) == "UTC"


async def test_offline_log_can_be_turned_off(tmp_path):
    settings = _settings(tmp_path, offline_log=False)
    await _write_history(settings, time.time())
    assert not view_dir(settings.feast.repo_dir, "user_features").exists()


def test_the_repo_folder_is_a_feast_repo_for_the_cli(tmp_path):
    settings = _settings(tmp_path)
    fs = open_store(settings)
    repo = Path(settings.feast.repo_dir).resolve()
    env = {**os.environ, "FEAST_USAGE": "False"}
    plan = subprocess.run([_feast_cli(), "plan"], cwd=repo, capture_output=True, text=True, env=env, timeout=240)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "delete" not in plan.stdout.lower() or "0 objects to delete" in plan.stdout.lower(), plan.stdout
    applied = subprocess.run([_feast_cli(), "apply"], cwd=repo, capture_output=True, text=True, env=env, timeout=240)
    assert applied.returncode == 0, applied.stderr[-3000:]
    fs.refresh_registry()
    assert sorted(v.name for v in fs.list_feature_views()) == ["item_features", "user_features"]
    assert sorted(s.name for s in fs.list_feature_services()) == sorted([RANKING_SERVICE, USER_SERVICE])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_feast_serve_reads_what_the_stream_wrote(tmp_path):
    settings = _settings(tmp_path)
    t0 = time.time() - 60
    await _write_history(settings, t0)
    open_store(settings)
    repo = Path(settings.feast.repo_dir).resolve()
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([_feast_cli(), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                              cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "FEAST_USAGE": "False"})
    try:
        body = json.dumps({"feature_service": RANKING_SERVICE, "full_feature_names": True,
                           "entities": {"user_id": ["u1", "u2"], "item_id": ["a", "a"]}}).encode()
        deadline = time.monotonic() + 180
        reply = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=10).read())
                break
            except OSError:
                time.sleep(0.5)
        assert reply is not None, (tmp_path / "serve.log").read_text()[-3000:]
        names = reply["metadata"]["feature_names"]
        values = {n: r["values"] for n, r in zip(names, reply["results"])}
        assert values["user_id"] == ["u1", "u2"]
        assert values["user_features__click_count"] == [3, 1]
        assert values["user_features__recent_items"] == ['["c", "b", "a"]', '["b"]']
        assert values["item_features__popularity_total"] == [2, 2]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
