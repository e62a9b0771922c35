"""The benches' backlog window (``driftrec.bench.ingest.produce_backlog``) against a stand-in worker: a
metrics endpoint whose ingested count grows at a known rate from the moment production starts. The window
must include what the worker ingested while the backlog was still being produced (the benches before
2026-12-07 opened it only after production had returned, and overstated the rate)."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from driftrec.bench import ingest

N_EVENTS, RATE, PRODUCE_S = 1000, 500.0, 1.0  # the stand-in ingests for 2 s, production takes 1 s


class _Worker:
    def __init__(self):
        self.started: float | None = None
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                t0 = worker.started
                done = 0 if t0 is None else min(N_EVENTS, int(RATE * (time.monotonic() - t0)))
                body = (f'driftrec_events_ingested_total{{event_type="click",outcome="ok"}} {done}.0\n'
                        f'driftrec_feature_rows_written_total{{feature_view="item_features",store="sqlite"}} {done}.0\n')
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def worker():
    w = _Worker()
    yield w
    w.server.shutdown()


def test_the_window_includes_what_was_ingested_while_the_backlog_was_produced(worker, monkeypatch):
    async def produce(bootstrap, settings, events):
        worker.started = time.monotonic()  # the worker ingests from the first record on
        await asyncio.sleep(PRODUCE_S)

    monkeypatch.setattr(ingest, "_produce", produce)
    s0 = [ingest._scrape(worker.port)]
    window, produced_s = ingest.produce_backlog("unused:9092", None, [{}] * N_EVENTS, [worker.port], s0=s0,
                                                timeout=30)
    assert produced_s >= PRODUCE_S
    # the stand-in needs N_EVENTS / RATE = 2 s from the first record; a window opened after production read ~1 s
    assert 1.7 <= window["users_s"] <= 2.8, window
    assert window["all_s"] >= window["users_s"]


def test_a_failed_production_stops_the_watcher_at_once(worker, monkeypatch):
    async def produce(bootstrap, settings, events):
        raise ConnectionError("broker away")

    monkeypatch.setattr(ingest, "_produce", produce)
    s0 = [ingest._scrape(worker.port)]
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        ingest.produce_backlog("unused:9092", None, [{}] * N_EVENTS, [worker.port], s0=s0, timeout=60)
    assert time.monotonic() - t0 < 10  # not the watcher's 60 s timeout
