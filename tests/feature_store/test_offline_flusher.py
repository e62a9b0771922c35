"""The writer process's offline appends on their own thread (BackgroundFlusher over a real OfflineLog)."""

from __future__ import annotations

import time

import pandas as pd

from driftrec.feature_store.offline import BackgroundFlusher, OfflineLog, view_dir


def _user(uid: str, t: float) -> dict:
    return {"user_id": uid, "recent_items": "[]", "click_count": 1, "rating_count": 0, "mean_rating": 0.0,
            "last_event_time": t, "genre_profile": "{}"}


def _files(repo, view="user_features"):
    folder = view_dir(repo, view)
    return sorted(folder.glob("part-*.parquet")) if folder.exists() else []


def _rows(repo) -> list[str]:
    files = _files(repo)
    return [] if not files else list(pd.concat([pd.read_parquet(f) for f in files])["user_id"])


def test_add_returns_at_once_and_the_thread_appends_when_due(tmp_path):
    offline = OfflineLog(tmp_path, flush_s=0.3, flush_rows=1000)
    flusher = BackgroundFlusher(offline)
    t = time.time()
    flusher.add([_user("u1", t), _user("u2", t)], [])
    assert _files(tmp_path) == []  # buffered, not written by add
    deadline = time.monotonic() + 10
    while not _files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rows(tmp_path) == ["u1", "u2"]  # written by the thread once flush_s passed, no call needed
    flusher.add([_user("u3", t)], [])
    flusher.close()  # what is left is written on close
    assert _rows(tmp_path) == ["u1", "u2", "u3"] and offline.buffered == 0


def test_a_failed_append_keeps_the_rows_in_order_for_the_next_try(tmp_path, monkeypatch):
    offline = OfflineLog(tmp_path, flush_s=0.2, flush_rows=2)
    real, calls = offline.write, []

    def flaky(rows_by_view):
        calls.append(sum(len(r) for r in rows_by_view.values()))
        if len(calls) == 1:
            raise OSError("disk away")
        return real(rows_by_view)

    monkeypatch.setattr(offline, "write", flaky)
    flusher = BackgroundFlusher(offline)
    t = time.time()
    flusher.add([_user("a", t), _user("b", t)], [])  # full: written at once - and fails
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    flusher.add([_user("c", t)], [])
    while not _files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    flusher.close()
    assert calls[0] == 2 and _rows(tmp_path) == ["a", "b", "c"]  # nothing lost, the failed rows first
