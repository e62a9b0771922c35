"""Streaming features into the online store: sustained events/s per worker, and freshness.

One real worker process (ingest + features agents only, ``DRIFTREC_AGENTS``) on the embedded
broker (or the configured one), with the online store under test (SQLite file or Redis):

1. **Throughput.** Once the worker has joined and written features (warm-up probes), a backlog of
   ``n_events`` clicks/ratings is produced at full speed (~1 s) and the worker's metrics are polled:
   the window runs from the first event counted as ingested
   (``driftrec_events_ingested_total{outcome="ok"}``: counted once the user stage is done with it;
   its user-row write may still be in flight) until the last one is and the item rows (one hop behind) stop moving.
   ``ingest_events_per_s`` = events / that window (``..._user_rows``: up to the last ingested).
2. **Freshness.** A paced stream at ``rate`` events/s (event time = send time) for ``seconds``;
   freshness is the worker's own ``driftrec_feature_freshness_seconds{store}`` histogram (event
   time -> row readable, observed per event right after the write that carries it), differenced over the
   window; p50/p99 are interpolated within its buckets (0.25 s is a bucket boundary, so
   ``freshness_le_250ms`` - the share at or under 250 ms - is exact).

    run(settings, store="sqlite") -> {"ingest_events_per_s", "freshness_p50_ms", "freshness_p99_ms", ...}
    run(settings, repeats=3)      -> [{"sqlite": {...}, "redis": {...}}, ...]   (driftrec.bench.run's form)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from driftrec.core.settings import Settings

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+([-+0-9.eEinfNa]+)$')


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def _metric(samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def _buckets(samples, name: str = "driftrec_feature_freshness_seconds", **labels: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, summed over the series whose labels match ``labels``."""
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == f"{name}_bucket" and all(lab.get(k) == x for k, x in labels.items()):
            le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return sorted(out.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within a bucket)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def produce_backlog(bootstrap: str, settings, backlog: list, ports: list[int], *, s0: list,
                    timeout: float = 300.0) -> tuple[dict[str, float], float]:
    """Produce ``backlog`` while :func:`backlog_window` watches the workers behind ``ports`` from a thread
    started before the first record is sent; ``(window, seconds the production took)``.

    The workers ingest while the backlog is still being produced (production takes seconds): a window
    that opened only once production had returned would leave out what they did meanwhile and
    overstate their rate (the figures before 2026-12-07 were taken that way)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        watch = pool.submit(backlog_window, ports, len(backlog), s0=s0, started=started, timeout=timeout, stop=stop)
        try:
            asyncio.run(_produce(bootstrap, settings, backlog))
        except BaseException:
            stop.set()  # the watcher gives up at once instead of polling until its timeout
            raise
        produced_s = time.monotonic() - started
        return watch.result(), produced_s


def backlog_window(ports: list[int], n_events: int, *, s0: list, started: float, timeout: float = 300.0,
                   stop=None) -> dict[str, float]:
    """Seconds the workers behind ``ports`` took for a backlog of ``n_events`` produced from ``started``.

    The window opens when the first event of the backlog is counted as ingested (summed over the
    workers: ``driftrec_events_ingested_total{outcome="ok"}`` past its value in ``s0``, their scrapes
    before the backlog) and closes when all are (``users_s``) and when, after that, the item rows
    (one hop behind) have stopped moving for 0.5 s (``all_s``). Call it while the backlog is produced
    (:func:`produce_backlog`), or the window opens late. ``stop`` (a ``threading.Event``): give up when set.
    """
    base_ok = sum(_metric(s, "driftrec_events_ingested_total", outcome="ok") for s in s0)
    items_rows = sum(_metric(s, "driftrec_feature_rows_written_total", feature_view="item_features") for s in s0)
    t_first = t_last = items_still_since = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        scrapes = [_scrape(p) for p in ports]
        done = sum(_metric(s, "driftrec_events_ingested_total", outcome="ok") for s in scrapes) - base_ok
        now = time.monotonic()
        if done > 0 and t_first is None:
            t_first = now
        if done >= n_events and t_last is None:
            t_last = now
        rows = sum(_metric(s, "driftrec_feature_rows_written_total", feature_view="item_features") for s in scrapes)
        if t_last is not None:
            if rows != items_rows:
                items_rows, items_still_since = rows, now
            elif items_still_since is None:
                items_still_since = now
            elif now - items_still_since >= 0.5:
                break
        time.sleep(0.05)
    if t_last is None:
        raise RuntimeError(f"only part of the backlog was ingested in {timeout}s")
    opened = t_first or started  # (no poll saw the first event alone: the backlog went in between two polls)
    return {"users_s": t_last - opened, "all_s": (items_still_since or t_last) - opened}


def _diff(after, before):
    b = dict(before)
    return [(le, c - b.get(le, 0.0)) for le, c in after]


class _World:
    def __init__(self, n_users: int, n_items: int, seed: int = 5) -> None:
        self.rng = random.Random(seed)
        self.users = [f"bu{k}" for k in range(n_users)]
        self.items = [f"bi{k}" for k in range(n_items)]
        genres = ["space", "western", "romance", "horror", "comedy", "war", "animation", "mystery"]
        self.catalogue = [{"type": "item", "event_id": f"bench-item-{k}", "event_time": time.time(), "item_id": iid,
                           "title": f"Item {k}", "genres": [genres[k % 8], genres[(k * 3) % 8]]}
                          for k, iid in enumerate(self.items)]

    def event(self, t: float) -> dict:
        r = self.rng
        ev = {"event_id": uuid.uuid4().hex, "event_time": t, "user_id": r.choice(self.users),
              "item_id": self.items[min(int(r.paretovariate(1.1)) - 1, len(self.items) - 1)] if r.random() < 0.5
              else r.choice(self.items)}
        if r.random() < 0.3:
            ev.update(type="rating", rating=float(r.randint(1, 5)))
        else:
            ev["type"] = "click"
        return ev


async def _produce(bootstrap: str, settings: Settings, events: list[dict]) -> None:
    from aiokafka import AIOKafkaProducer

    t = settings.topics
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futs = []
        for ev in events:
            topic = {"item": t.items.name, "rating": t.ratings.name, "click": t.clicks.name,
                     "recommendation_request": t.requests.name}[ev["type"]]
            key = (ev["item_id"] if ev["type"] == "item" else ev["user_id"]).encode()
            futs.append(await producer.send(topic, json.dumps(ev, separators=(",", ":")).encode(), key=key))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _paced(bootstrap: str, settings: Settings, world: _World, rate: float, seconds: float) -> int:
    """Produce ``rate`` events/s for ``seconds`` (event time = send time), every 10 ms what is due.

    The generator shares the 2 cores with the broker and the worker it measures, so it sends each
    tick's events as one record batch per partition (the producer's batch API, keyed like the
    default partitioner) rather than one ``send`` per event, which cost a quarter of a core at
    5,000 events/s.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    t = settings.topics
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, enable_idempotence=False)
    await producer.start()
    partitioner = DefaultPartitioner()
    sent = 0
    try:
        parts = {name: sorted(await producer.partitions_for(name)) for name in (t.clicks.name, t.ratings.name)}
        start = time.monotonic()
        tick = 0.01
        futs = []
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) - sent
            now = time.time()
            batches: dict[tuple[str, int], Any] = {}
            for _ in range(max(due, 0)):
                ev = world.event(now)
                topic = t.ratings.name if ev["type"] == "rating" else t.clicks.name
                key = ev["user_id"].encode()
                partition = partitioner(key, parts[topic], parts[topic])
                batch = batches.get((topic, partition))
                if batch is None:
                    batch = batches[(topic, partition)] = producer.create_batch()
                value = json.dumps(ev, separators=(",", ":")).encode()
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                    futs.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = batches[(topic, partition)] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                sent += 1
            for (topic, partition), batch in batches.items():
                futs.append(await producer.send_batch(batch, topic, partition=partition))
            if len(futs) > 200:
                await asyncio.gather(*futs)
                futs = []
            await asyncio.sleep(tick)
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return sent


def _profiler(pid: int, phase: str) -> subprocess.Popen | None:
    """py-spy on the worker during ``phase`` when asked (a diagnostic, see the README's Benchmarks):
    ``DRIFTREC_BENCH_PROFILE=out.txt`` (raw stacks), ``DRIFTREC_BENCH_PROFILE_PHASE=backlog|paced``
    (default backlog), ``DRIFTREC_BENCH_PROFILE_S`` (seconds), ``DRIFTREC_BENCH_PROFILE_ALL=1`` (the
    writer process too, all threads; otherwise the paced phase samples only the thread holding the GIL)."""
    out = os.environ.get("DRIFTREC_BENCH_PROFILE")
    if not out or os.environ.get("DRIFTREC_BENCH_PROFILE_PHASE", "backlog") != phase:
        return None
    every = bool(os.environ.get("DRIFTREC_BENCH_PROFILE_ALL"))
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", out,
           "-d", os.environ.get("DRIFTREC_BENCH_PROFILE_S", "15" if phase == "backlog" else "8")]
    cmd += ["--subprocesses"] if every else ["--gil"] if phase == "paced" else []
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of ``pid`` and of all its descendants (the writer process, the fork server)."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(p: int) -> float:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat[stat.rfind(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / tick

    def children(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    rest, todo = 0.0, children(pid)
    while todo:
        c = todo.pop()
        rest += own(c)
        todo += children(c)
    return own(pid), rest


def _wait_port(log_path: Path, proc: subprocess.Popen, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics on 127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace") if log_path.exists() else "")
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"no metrics port in {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_one(settings: Settings, store: str, *, n_events: int = 60_000, rate: float = 5000.0, seconds: float = 10.0,
            n_users: int = 2000, n_items: int = 1000, timeout: float = 300.0,
            agents: str = "driftrec.streams.agents.ingest,driftrec.streams.agents.features") -> dict[str, Any]:
    """One store, one worker. ``agents`` other than the default is a diagnostic (e.g. ingest alone)."""
    from driftrec.core.broker import broker
    from driftrec.demo import child_env

    if store == "redis":
        from driftrec.feature_store.backends.redis import ping

        if not ping(settings.feast.redis_url):
            raise RuntimeError(f"Redis is not reachable at {settings.feast.redis_url}")
    world = _World(n_users, n_items)
    run_dir = Path(tempfile.mkdtemp(prefix=f"driftrec-bench-ingest-{store}-"))
    proc = None
    try:
        with broker(settings) as bootstrap:
            asyncio.run(_produce(bootstrap, settings, world.catalogue))
            log_path = run_dir / "worker.log"
            env = child_env(settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0",
                            DRIFTREC_AGENTS=agents,
                            DRIFTREC_FEAST__ONLINE_STORE=store, DRIFTREC_FEAST__PROJECT=f"bench_{uuid.uuid4().hex[:8]}",
                            DRIFTREC_FEAST__REDIS_KEY_TTL_S="3600", DRIFTREC_LOG_LEVEL="WARNING",
)
            with open(log_path, "ab") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "driftrec.cli", "worker"], env=env, stdout=fh,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            port = _wait_port(log_path, proc)
            # warm-up: the worker has joined and written features once
            deadline = time.monotonic() + 120
            while True:
                asyncio.run(_produce(bootstrap, settings, [world.event(time.time()) for _ in range(20)]))
                time.sleep(1.0)
                s = _scrape(port)
                if _metric(s, "driftrec_feature_rows_written_total", feature_view="item_features") > 0:
                    break
                if "features" not in agents and _metric(s, "driftrec_events_ingested_total", outcome="ok") > 0:
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"worker never wrote features:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(1.0)

            # 1. throughput: a backlog of n_events
            s0 = _scrape(port)
            backlog = [world.event(time.time()) for _ in range(n_events)]
            profiler = _profiler(proc.pid, "backlog")
            window, produced_s = produce_backlog(bootstrap, settings, backlog, [port], s0=[s0], timeout=timeout)
            if profiler is not None:
                profiler.wait(60)
            span_users, span_all = window["users_s"], window["all_s"]

            # 2. freshness at a paced rate
            time.sleep(1.0)
            s1 = _scrape(port)
            profiler = _profiler(proc.pid, "paced")
            cpu1 = _cpu_seconds(proc.pid)
            sent = asyncio.run(_paced(bootstrap, settings, world, rate, seconds))
            time.sleep(1.0)
            s2 = _scrape(port)
            cpu2 = _cpu_seconds(proc.pid)
            if profiler is not None:
                profiler.wait(60)
            buckets = _diff(_buckets(s2, store=store), _buckets(s1, store=store))
            per_view = {}
            for view in ("user_features", "item_features"):
                vb = _diff(_buckets(s2, store=store, feature_view=view), _buckets(s1, store=store, feature_view=view))
                q = histogram_quantile(0.99, vb)
                per_view[view] = None if q is None else q * 1000
            total = buckets[-1][1] if buckets else 0
            le250 = next((c for le, c in buckets if le == 0.25), 0.0)
            p50 = histogram_quantile(0.5, buckets)
            p99 = histogram_quantile(0.99, buckets)
            lag = _diff(_buckets(s2, "driftrec_event_loop_lag_seconds"), _buckets(s1, "driftrec_event_loop_lag_seconds"))
            lag_p99 = histogram_quantile(0.99, lag)
            ws = _metric(s2, "driftrec_feature_write_seconds_sum", store=store) - _metric(s1, "driftrec_feature_write_seconds_sum", store=store)
            wc = _metric(s2, "driftrec_feature_write_seconds_count", store=store) - _metric(s1, "driftrec_feature_write_seconds_count", store=store)
            paced = {}
            for agent in ("ingest", "features_items"):
                n = (_metric(s2, "driftrec_agent_processing_seconds_count", agent=agent)
                     - _metric(s1, "driftrec_agent_processing_seconds_count", agent=agent))
                busy = (_metric(s2, "driftrec_agent_processing_seconds_sum", agent=agent)
                        - _metric(s1, "driftrec_agent_processing_seconds_sum", agent=agent))
                paced[agent] = {"batches_per_s": n / seconds, "busy_share": busy / seconds}
            _stop(proc)
            return {
                "store": store,
                "ingest_events_per_s": n_events / span_all,
                "ingest_events_per_s_user_rows": n_events / span_users,
                "freshness_p50_ms": None if p50 is None else p50 * 1000,
                "freshness_p99_ms": None if p99 is None else p99 * 1000,
                "freshness_le_250ms": (le250 / total) if total else None,
                "freshness_p99_ms_by_view": per_view,
                "freshness_rows": total,
                "paced_rate": sent / seconds,
                "paced_write_ms_mean": (ws / wc * 1000) if wc else None,
                "paced_writes_per_s": wc / seconds,
                "paced_agents": paced,
                # CPU per event over the paced window (+1 s): the worker's own process, and its
                # descendants (the writer process)
                "paced_worker_cpu_us_per_event": (cpu2[0] - cpu1[0]) / max(sent, 1) * 1e6,
                "paced_writer_cpu_us_per_event": (cpu2[1] - cpu1[1]) / max(sent, 1) * 1e6,
                "paced_loop_lag_p99_ms": None if lag_p99 is None else lag_p99 * 1000,
                "n_events": n_events,
                "backlog_produce_s": produced_s,
                "users": n_users,
                "items": n_items,
            }
    finally:
        if proc is not None:
            _stop(proc)
        if os.environ.get("DRIFTREC_BENCH_KEEP_LOG") and (run_dir / "worker.log").exists():
            shutil.copy(run_dir / "worker.log", os.environ["DRIFTREC_BENCH_KEEP_LOG"])
        shutil.rmtree(run_dir, ignore_errors=True)


def run(settings: Settings, store: str | None = None, repeats: int = 1, **kw: Any):
    """``store`` given: one flat result (the median-free single run); else per-store runs for driftrec.bench.run."""
    if store is not None:
        return run_one(settings, store, **kw)
    runs = []
    for _ in range(repeats):
        one: dict[str, Any] = {}
        for s in ("sqlite", "redis"):
            try:
                one[s] = run_one(settings, s, **kw)
            except RuntimeError as exc:
                if s == "redis" and "not reachable" in str(exc):
                    one[s] = {"skipped": str(exc)}
                else:
                    raise
        runs.append(one)
    return runs


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="driftrec ingest/freshness benchmark")
    p.add_argument("--store", choices=["sqlite", "redis"], default=None)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--rate", type=float, default=5000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--agents", default="driftrec.streams.agents.ingest,driftrec.streams.agents.features",
                   help="agent modules the worker runs (diagnostic: driftrec.streams.agents.ingest alone)")
    a = p.parse_args()
    out = run(Settings.load(), store=a.store, n_events=a.events, rate=a.rate, seconds=a.seconds, agents=a.agents)
    print(json.dumps(out, indent=2))
