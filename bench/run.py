"""``driftrec bench``: the benchmark suite, one JSON + one Markdown table.

Each benchmark is a module in ``bench/`` with ``run(settings, repeats) -> dict``; a figure is the
median over ``repeats`` runs (the raw runs are kept in the JSON). The summary keys every issue
refers to are always present (``null`` when not measured):

``ingest_events_per_s`` and ``freshness_p99_ms`` (each ``{"sqlite": …, "redis": …}``),
``score_p99_ms``, ``score_max_rps``, ``e2e_p99_ms``, ``e2e_max_rps_p99_250ms``, ``swap_pause_p99_ms``, ``api_p99_ms``, ``api_rps``, ``served_max_rps_p99_50ms``, ``adapter_update_s``,
``workers_speedup``, ``scale_rank_p99_ms_100k``, ``scale_rss_mb_1m_users``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# name -> (module, what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ingest": ("driftrec.bench.ingest", "events/s into the online store per worker, freshness p50/p99 (SQLite, Redis)"),
    "scoring": ("driftrec.bench.scoring", "LM scoring latency p50/p99 for 100 candidates; hot-swap pause p99"),
    "e2e": ("driftrec.bench.e2e", "event -> recommendation latency p50/p95/p99 at 50 requests/s with 2,000 events/s "
                                  "of ingest, and the highest request rate with p99 <= 250 ms"),
    "api": ("driftrec.bench.api", "the worker's synchronous API: latency p50/p99, the highest open-loop request rate "
                                  "with p99 <= 50 ms, requests/s under 8 clients + ingest"),
    "workers": ("driftrec.bench.workers", "pipeline throughput with 1 vs 2 Faust workers"),
    "scorer_fault": ("driftrec.bench.scorer_fault", "full-worker ingest with requests: a 5 s scorer vs one that answers at once"),
    "adapter_update": ("driftrec.bench.adapter_update", "trigger -> new model serving (train, gate, publish, swap): "
                                                        "the knowledge model (policy engine) and the LoRA adapter (loop)"),
    "learning": ("driftrec.bench.learning", "how many interactions/s the ranking policy learns, per "
                                            "(hard_pool_every, learn_fraction) setting"),
    "scale": ("driftrec.bench.scale", "the ranking policy's recommend p50/p99 and RSS vs catalogue size (2k-100k items), "
                                      "state ingest rate, RSS and bytes per user vs users (10k-1M)"),
}

TARGETS = {
    "ingest_events_per_s.sqlite": (">=", 20_000), "ingest_events_per_s.redis": (">=", 20_000),
    "freshness_p99_ms.sqlite": ("<=", 250), "freshness_p99_ms.redis": ("<=", 250),
    "score_p99_ms": ("<=", 50), "swap_pause_p99_ms": ("<=", 30), "adapter_update_s": ("<=", 30),
    "e2e_p99_ms": ("<=", 250), "e2e_max_rps_p99_250ms": (">=", 100), "slow_scorer_ingest_ratio": (">=", 0.8),
    "scale_rank_p99_ms_100k": ("<=", 100), "score_max_rps": (">=", 300),
    "served_max_rps_p99_50ms": (">=", 300), "workers_speedup_spread": ("<=", 0.15),
}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_gb"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per numeric key (nested one level for per-store dicts)."""
    out: dict[str, Any] = {}
    keys = {k for r in runs for k in r}
    for k in sorted(keys):
        vals = [r[k] for r in runs if k in r]
        if all(isinstance(v, dict) for v in vals):
            out[k] = median_of(vals)
        elif vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = statistics.median(vals)
        elif vals:
            out[k] = vals[-1]
    return out


def spread(values: list[float]) -> float:
    """The largest relative distance of a repeat from the repeats' median (0.15 = within +-15 %)."""
    m = statistics.median(values)
    return max(abs(v - m) for v in values) / m if m else float("inf")


def _scale(results: dict[str, dict[str, Any]], part: str, size: int, key: str) -> Any:
    """One figure of the scale benchmark: ``results["scale"][part][str(size)][key]`` (None when absent)."""
    block = results.get("scale", {}).get(part, {}).get(str(size))
    return block.get(key) if isinstance(block, dict) else None


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ing = results.get("ingest", {})
    sc = results.get("scoring", {})
    return {
        "ingest_events_per_s": {s: ing.get(s, {}).get("ingest_events_per_s") for s in ("sqlite", "redis")},
        "freshness_p50_ms": {s: ing.get(s, {}).get("freshness_p50_ms") for s in ("sqlite", "redis")},
        "freshness_p99_ms": {s: ing.get(s, {}).get("freshness_p99_ms") for s in ("sqlite", "redis")},
        "score_p50_ms": sc.get("score_p50_ms"),
        "score_p99_ms": sc.get("score_p99_ms"),
        "score_max_rps": sc.get("score_max_rps"),
        "swap_pause_p99_ms": sc.get("swap_pause_p99_ms"),
        "e2e_p50_ms": results.get("e2e", {}).get("e2e_p50_ms"),
        "e2e_p95_ms": results.get("e2e", {}).get("e2e_p95_ms"),
        "e2e_p99_ms": results.get("e2e", {}).get("e2e_p99_ms"),
        "e2e_max_rps_p99_250ms": results.get("e2e", {}).get("e2e_max_rps_p99_250ms"),
        "api_p50_ms": results.get("api", {}).get("api_p50_ms"),
        "api_p99_ms": results.get("api", {}).get("api_p99_ms"),
        "api_rps": results.get("api", {}).get("api_rps"),
        "api_loaded_p99_ms": results.get("api", {}).get("api_loaded_p99_ms"),
        "served_max_rps_p99_50ms": results.get("api", {}).get("served_max_rps_p99_50ms"),
        "slow_scorer_ingest_ratio": results.get("scorer_fault", {}).get("slow_scorer_ingest_ratio"),
        "adapter_update_s": results.get("adapter_update", {}).get("adapter_update_s"),
        "adapter_update_engine": results.get("adapter_update", {}).get("engine"),
        "adapter_update_s_policy": results.get("adapter_update", {}).get("adapter_update_s_policy"),
        "adapter_update_s_loop": results.get("adapter_update", {}).get("adapter_update_s_loop"),
        "first_model_s_policy": results.get("adapter_update", {}).get("policy", {}).get("first_model_s"),
        "workers_speedup": results.get("workers", {}).get("workers_speedup"),
        "workers_speedup_spread": results.get("workers", {}).get("workers_speedup_spread"),
        "scale_rank_p99_ms_100k": _scale(results, "catalogue", 100_000, "rank_p99_ms"),
        "scale_rank_p99_ms_100k_no_knn": _scale(results, "catalogue", 100_000, "rank_p99_ms_no_knn"),
        "scale_rss_mb_1m_users": _scale(results, "users", 1_000_000, "rss_mb"),
    }


def verdicts(summ: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, (op, target) in TARGETS.items():
        head, _, store = key.partition(".")
        value = summ.get(head)
        if store:
            value = (value or {}).get(store)
        if value is None:
            out[key] = "not measured"
        else:
            ok = value >= target if op == ">=" else value <= target
            out[key] = f"{'met' if ok else 'NOT met'} ({value:.4g} {op} {target})"
    return out


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    m = doc["machine"]
    fmt = lambda v: "—" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [
        ("ingest events/s per worker (SQLite / Redis)", f"{fmt(s['ingest_events_per_s']['sqlite'])} / {fmt(s['ingest_events_per_s']['redis'])}"),
        ("freshness p50 ms (SQLite / Redis)", f"{fmt(s['freshness_p50_ms']['sqlite'])} / {fmt(s['freshness_p50_ms']['redis'])}"),
        ("freshness p99 ms (SQLite / Redis)", f"{fmt(s['freshness_p99_ms']['sqlite'])} / {fmt(s['freshness_p99_ms']['redis'])}"),
        ("LM scoring p50 / p99 ms (100 candidates)", f"{fmt(s['score_p50_ms'])} / {fmt(s['score_p99_ms'])}"),
        ("LM scorer requests/s with p99 <= 50 ms (HTTP, 100 candidates)", fmt(s.get("score_max_rps"))),
        ("hot-swap pause p99 ms", fmt(s["swap_pause_p99_ms"])),
        ("event -> recommendation p50 / p95 / p99 ms (50 requests/s, 2,000 events/s ingest)",
         f"{fmt(s['e2e_p50_ms'])} / {fmt(s.get('e2e_p95_ms'))} / {fmt(s['e2e_p99_ms'])}"),
        ("highest request rate with e2e p99 <= 250 ms", fmt(s.get("e2e_max_rps_p99_250ms"))),
        ("synchronous API p50 / p99 ms (sequential)", f"{fmt(s.get('api_p50_ms'))} / {fmt(s.get('api_p99_ms'))}"),
        ("synchronous API requests/s / p99 ms (8 clients, 500 events/s ingest)",
         f"{fmt(s.get('api_rps'))} / {fmt(s.get('api_loaded_p99_ms'))}"),
        ("served recommendations/s with p99 <= 50 ms (open-loop steps, 2,000 items, knowledge model)",
         fmt(s.get("served_max_rps_p99_50ms"))),
        (f"trigger -> new model serving s ({s.get('adapter_update_engine') or '?'} engine: adapter_update_s)",
         fmt(s["adapter_update_s"])),
        ("trigger -> new knowledge model serving s (policy engine; its first model, from scratch)",
         f"{fmt(s.get('adapter_update_s_policy'))} ({fmt(s.get('first_model_s_policy'))})"),
        ("trigger -> new LoRA adapter serving s (loop engine's LM scorer)", fmt(s.get("adapter_update_s_loop"))),
        ("throughput 2 workers / 1 worker (largest distance of a repeat from the median)",
         f"{fmt(s['workers_speedup'])} ({fmt(s.get('workers_speedup_spread'))})"),
        ("ingest with a 5 s scorer / with a prompt one (loop engine)", fmt(s.get("slow_scorer_ingest_ratio"))),
    ]
    res = doc.get("results", {})
    if "scale" in res:
        cats, users = (2_000, 20_000, 100_000), (10_000, 100_000, 1_000_000)
        cat = lambda key: " / ".join(fmt(_scale(res, "catalogue", n, key)) for n in cats)  # noqa: E731
        usr = lambda key: " / ".join(fmt(_scale(res, "users", n, key)) for n in users)  # noqa: E731
        rows += [
            ("policy recommend p50 ms at 2k / 20k / 100k items (5k warm users, 1 thread)", cat("rank_p50_ms")),
            ("policy recommend p99 ms at 2k / 20k / 100k items", cat("rank_p99_ms")),
            ("the same p99 with the item-kNN scores zeroed", cat("rank_p99_ms_no_knn")),
            ("policy process RSS MB at 2k / 20k / 100k items", cat("rss_mb")),
            ("policy state events/s at 10k / 100k / 1M users (2,000 items)", usr("state_events_per_s")),
            ("policy process RSS MB at 10k / 100k / 1M users", usr("rss_mb")),
            ("RSS bytes per user at 10k / 100k / 1M users", usr("bytes_per_user")),
            ("policy recommend p99 ms at 10k / 100k / 1M users", usr("rank_p99_ms")),
        ]
    lines = [f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} cores, {m.get('mem_gb', '?')} GB, GPU: {m.get('gpu') or 'none'}; "
             f"repeats: {doc['repeats']}; {doc['elapsed_s']:.0f} s in all.", "", "| figure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "| target | verdict |", "|---|---|"] + [f"| {k} | {v} |" for k, v in doc["verdicts"].items()]
    if doc.get("errors"):
        lines += ["", "Errors:"] + [f"- {k}: {v.splitlines()[-1] if v else ''}" for k, v in doc["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="driftrec bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--json", default="bench/results/latest.json", help="JSON output (Markdown beside it, .md)")
    p.add_argument("--repeats", type=int, default=3, help="runs per benchmark; figures are medians (default 3)")
    p.add_argument("--config", help="YAML settings file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")

    from driftrec.core.settings import Settings

    settings = Settings.load(config=args.config)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        module, what = BENCHMARKS[name]
        print(f"== {name}: {what}", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(module)
            if getattr(mod, "REPEATS_ARE_SAMPLES", False):  # its `repeats` counts requests, not runs
                runs = [mod.run(settings) for _ in range(args.repeats)]
            else:
                runs = mod.run(settings, repeats=args.repeats)
            runs = runs if isinstance(runs, list) else [runs]
            raw[name] = runs
            results[name] = median_of(runs)
            if name == "workers" and len(runs) > 1:  # does the measurement hold? the repeats' spread
                results[name]["workers_speedup_spread"] = spread([r["workers_speedup"] for r in runs])
            print(json.dumps(results[name], default=str)[:800], file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr, flush=True)
    summ = summary(results)
    doc = {
        **summ,
        "summary": summ,
        "verdicts": verdicts(summ),
        "results": results,
        "runs": raw,
        "errors": errors,
        "machine": machine(),
        "repeats": args.repeats,
        "command": "driftrec bench " + " ".join(argv or sys.argv[1:]),
        "elapsed_s": time.monotonic() - started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
