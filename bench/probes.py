"""Probes behind the streaming design: each measures one choice the features path makes.

    python -m driftrec.bench.probes delivery       # a trivial Faust agent: Faust's per-message path vs batches
    python -m driftrec.bench.probes writer-thread  # SQLite rows from a thread beside a busy thread vs alone
    python -m driftrec.bench.probes gc             # a full collection with Feast and Faust imported, frozen or not

They are not part of ``driftrec bench`` (they measure libraries, not driftrec); the numbers quoted in
docs/streaming_features.md come from these commands on the 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def delivery(n: int = 100_000) -> dict:
    """Events/s of an agent that only parses JSON: take_events (Faust) vs driftrec.streams.batching."""
    out = {}
    for mode in ("faust_take_events", "batching"):
        code = _DELIVERY_CHILD.format(n=n, mode=mode, root=str(Path(__file__).resolve().parents[1]))
        proc = _run_child(code, timeout=300)
        line = next(ln for ln in reversed(proc.splitlines()) if '"events_per_s"' in ln)
        out[mode] = json.loads(line[line.index("{"):])["events_per_s"]
    return out


_DELIVERY_CHILD = r'''
import asyncio, json, os, sys, time, uuid
sys.path.insert(0, {root!r})
import faust
from driftrec.core.broker import EmbeddedBroker
from driftrec.streams.faust_patches import apply_tansu
from driftrec.streams.batching import BatchingTransport, batch_agent

N, MODE = {n}, {mode!r}

async def produce(bootstrap):
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, enable_idempotence=False, linger_ms=5)
    await p.start()
    futs = [await p.send("src", json.dumps({{"type": "click", "event_id": uuid.uuid4().hex, "event_time": time.time(),
                                             "user_id": f"u{{i % 1000}}", "item_id": f"i{{i % 1700}}"}}).encode(),
                         key=f"u{{i % 1000}}".encode()) for i in range(N)]
    await asyncio.gather(*futs)
    await p.stop()

class App(faust.App):
    def _new_transport(self):
        return BatchingTransport(self.conf.broker_consumer, self)

b = EmbeddedBroker().start()
async def topic():
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    a = AIOKafkaAdminClient(bootstrap_servers=b.bootstrap_servers); await a.start()
    await a.create_topics([NewTopic("src", 4, 1)]); await a.close()
asyncio.run(topic()); asyncio.run(produce(b.bootstrap_servers))
apply_tansu()
app = (App if MODE == "batching" else faust.App)("probe-" + uuid.uuid4().hex[:6], broker=f"kafka://{{b.bootstrap_servers}}",
       store="memory://", web_enabled=False, broker_session_timeout=10, broker_heartbeat_interval=3, topic_partitions=4,
       consumer_auto_offset_reset="earliest", autodiscover=False, broker_max_poll_records=5000)
src = app.topic("src", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
st = {{"n": 0, "t0": None}}
def count(k):
    if st["t0"] is None: st["t0"] = time.perf_counter()
    st["n"] += k
    if st["n"] >= N:
        # to the real stdout: a Faust worker redirects sys.stdout into its logger
        os.write(1, (json.dumps({{"events_per_s": N / (time.perf_counter() - st["t0"])}}) + "\n").encode())
        b.stop(); os._exit(0)
if MODE == "batching":
    async def handle(batch):
        for m in batch.messages: json.loads(m.value)
        count(len(batch.messages))
        return []
    batch_agent(app, [src], name="probe", handler=handle)
else:
    @app.agent(src)
    async def agent(stream):
        async for events in stream.take_events(1000, within=0.05):
            for e in events: json.loads(e.value)
            count(len(events))
from faust.worker import Worker
Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
'''


def _run_child(code: str, timeout: float) -> str:
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 and "events_per_s" not in res.stdout:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-2000:])
    return res.stdout


def writer_thread(rows: int = 3000) -> dict:
    """Seconds to upsert ``rows`` Feast user rows through the SQLite row store: alone, then from a
    thread while another thread keeps the interpreter busy (the event loop of a loaded worker)."""
    from driftrec.core.settings import Settings
    from driftrec.feature_store.repo import open_store
    from driftrec.feature_store.backends.sqlite import Rows

    tmp = Path(tempfile.mkdtemp(prefix="driftrec-probe-"))
    settings = Settings(feast={"repo_dir": str(tmp), "project": f"probe_{uuid.uuid4().hex[:8]}"})
    store = Rows(open_store(settings, "sqlite"))
    t = time.time()
    data = [{"user_id": f"u{k}", "recent_items": json.dumps([f"m{j}" for j in range(20)]), "click_count": k,
             "rating_count": 1, "mean_rating": 3.5, "last_event_time": t, "genre_profile": "{}"} for k in range(rows)]

    def timed() -> float:
        t0 = time.perf_counter()
        store.write(data, [])
        return time.perf_counter() - t0

    alone = min(timed() for _ in range(3))
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.append(timed()))
        worker.start()
        worker.join(600)
    finally:
        stop.set()
        spinner.join()
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "alone_s": alone, "thread_beside_busy_thread_s": result[0] if result else None}


def gc_pause() -> dict:
    """A full collection after importing what a worker imports, before and after ``gc.freeze``."""
    import gc

    import faust  # noqa: F401
    import feast  # noqa: F401

    def full() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t0

    before = min(full() for _ in range(3))
    tracked = len(gc.get_objects())
    gc.freeze()
    after = min(full() for _ in range(3))
    return {"tracked_objects": tracked, "full_collection_s": before, "after_freeze_s": after}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m driftrec.bench.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["delivery", "writer-thread", "gc"])
    args = p.parse_args(argv)
    fn = {"delivery": delivery, "writer-thread": writer_thread, "gc": gc_pause}[args.probe]
    print(json.dumps(fn(), indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
