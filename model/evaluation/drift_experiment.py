"""``driftrec experiment drift``: how fast incremental adapter updates follow an abrupt preference shift.

In-process fast path (no Kafka): the synthetic :class:`driftrec.model.evaluation.world.World` streams clicks and ratings;
at ``shift_at`` an abrupt shift happens, by default ``shift_kind="relation"``: from then on a user's next
item comes from a fixed derangement of the genres of their newest item, so "items like my history" stops
being right for good (concept drift; ``--shift-kind taste`` moves every user's taste to other genres
instead, which a frozen content model follows by itself once histories turn over). Two arms start from
the same adapter, trained on the pre-shift warm-up window with the production code
(:class:`driftrec.model.training.worker.TrainingWorker`: :class:`driftrec.model.training.drift_trainer.DriftTrainer` + :mod:`driftrec.model.training.gate`
+ checkpoint publishing):

* **updates**: the worker trains on the newest ``window`` events every ``every_events`` events, and at
  once when the River drift detector on the serving adapter's online error fires; each candidate goes
  through the gate, and only promoted versions serve;
* **frozen**: the warm-up adapter serves forever.

The stream is cut into blocks; each positive interaction of a block (an item the user had not seen) is
a test case, ranked against every catalogue item by the adapter serving at the start of the block
(test-then-train). HR@10 per block is the series. ``recovery_events_*`` = events after the shift until
the ``smooth``-block (3) rolling HR@10 first gets back to ``recovery_frac`` (90%) of the arm's pre-shift
level (null if never). Writes the JSON, and with ``--report DIR`` a Markdown report and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DriftExperimentConfig:
    users: int = 1000
    items: int = 160
    seed: int = 7
    shift_at: int = 4000
    shift_kind: str = "relation"  # driftrec.model.evaluation.world.World.shift_kind: "relation" | "taste"
    warmup_start: int = 2400  # warm-up training window [warmup_start, measure_start); events before: history only
    measure_start: int = 3400  # blocks from here; pre-shift level = blocks before shift_at
    post_events: int = 2500
    block: int = 100
    every_events: int = 200
    window: int = 600
    context: int = 3000  # older events that only fill user histories for a training run
    max_steps: int = 20
    warmup_steps: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    replay_buffer: int = 32
    max_length: int = 64
    history_items: int = 10
    recovery_frac: float = 0.9
    smooth: int = 3
    drift_trigger: bool = True
    multitask: bool = False
    adversarial_eps: float = 0.0
    augment: bool = False
    gate_tolerance: float = 0.02
    threads: int = 1


def _settings(cfg: DriftExperimentConfig, adapter_dir: Path):
    from driftrec.core.settings import Settings

    return Settings(
        model={"adapter_dir": str(adapter_dir), "device": "cpu", "max_length": cfg.max_length},
        trainer={
            "every_events": cfg.every_events, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate, "replay_buffer": cfg.replay_buffer,
            "gate_tolerance": cfg.gate_tolerance, "window_events": cfg.window, "history_items": cfg.history_items,
            "multitask": cfg.multitask, "adversarial_eps": cfg.adversarial_eps, "augment": cfg.augment,
            "user_max_length": cfg.max_length, "item_max_length": cfg.max_length, "min_examples": 16,
            "holdout_frac": 0.2, "online_window": 200,
        },
    )


def recovery_events(series: list[dict], shift_at: int, level: float, frac: float, smooth: int, key: str) -> int | None:
    """Events after the shift until the rolling HR@10 first reaches ``frac * level`` (None: never)."""
    post = [p for p in series if p["start"] >= shift_at and not math.isnan(p[key])]
    if not post or not level or math.isnan(level):
        return None
    vals = [p[key] for p in post]
    for n in range(len(post)):
        window = vals[max(0, n - smooth + 1): n + 1]
        if n + 1 >= smooth and float(np.mean(window)) >= frac * level:
            return int(post[n]["end"] - shift_at)
    return None


def run_experiment(cfg: DriftExperimentConfig, *, adapter_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the drift experiment (see the module docstring) and return its result dict."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _DriftRun(cfg, adapter_dir, progress=progress)
    run.warm_up()
    run.watch_drift()
    for start in range(cfg.measure_start, len(run.events), cfg.block):
        run.process_block(start)
    out = run.result()
    run.cleanup()
    return out


class _DriftRun:
    """The state of one drift experiment: the world's events, the training worker (the ``updates`` arm),
    the frozen warm-up adapter, the history tracker that turns events into test cases, and the series."""

    def __init__(self, cfg: DriftExperimentConfig, adapter_dir: Path | None, *, progress: bool) -> None:
        from driftrec.model.evaluation.world import World
        from driftrec.model.training.examples import ExampleBuilder
        from driftrec.model.training.gate import ItemMatrixCache
        from driftrec.model.training.worker import TrainingWorker

        self.cfg = cfg
        self.progress = progress
        self.t_start = time.perf_counter()
        self.tmp = None
        if adapter_dir is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="driftrec-exp-")
            adapter_dir = Path(self.tmp.name)
        self.settings = _settings(cfg, adapter_dir)
        self.world = World(n_users=cfg.users, n_items=cfg.items, seed=cfg.seed, shift_at=cfg.shift_at,
                           shift_kind=cfg.shift_kind)
        self.events = list(self.world.events(cfg.shift_at + cfg.post_events))
        self.worker = TrainingWorker(self.settings, items=self.world.items, seed=cfg.seed)
        lookup = {it.item_id: it for it in self.world.items}.get
        self.tracker = ExampleBuilder(lookup, history_items=cfg.history_items, hard_negatives=0)
        self.drift = {"fired": 0, "pending": False}
        self.frozen_cache = ItemMatrixCache(size=1)
        self.serving_cache = ItemMatrixCache(size=2)
        self.series: list[dict] = []
        self.runs: list[dict] = []
        self.since_run = 0
        self.train_s = 0.0

    # ----------------------------------------------------------------------------- warm-up

    def warm_up(self) -> None:
        """Fill the users' histories before the warm-up window (no model work), train the warm-up adapter
        on ``[warmup_start, measure_start)``, keep it as the frozen arm, then add that window to the histories."""
        cfg, events, worker = self.cfg, self.events, self.worker
        self._track(events[: cfg.warmup_start])
        t0 = time.perf_counter()
        self.warm = worker.run_once(events[cfg.warmup_start: cfg.measure_start], trigger="warmup",
                                    max_steps=cfg.warmup_steps,
                                    context=events[max(0, cfg.warmup_start - cfg.context): cfg.warmup_start])
        self.warmup_s = time.perf_counter() - t0
        self.frozen_version = worker.serving_version
        self.frozen_model = worker.serving_model(self.frozen_version)
        if self.frozen_version != "base":  # keep a private copy: the worker's cache moves on
            worker._serving_models = {}
        log.info("warm-up: %s -> serving %s (%.1fs)", self.warm.outcome, self.frozen_version, self.warmup_s)
        self._track(events[cfg.warmup_start: cfg.measure_start])

    def _track(self, events: list) -> None:
        """Add ``events`` to the users' histories without making test cases of them."""
        for e in events:
            self.tracker.holdout_case(e)

    def watch_drift(self) -> None:
        """With ``cfg.drift_trigger``: count the drift detector's detections and retrain after the next one."""
        drift = self.drift
        if self.cfg.drift_trigger:
            self.worker.monitor.on_drift(lambda ev: drift.update(fired=drift["fired"] + 1, pending=True))

    # ------------------------------------------------------------------------------ blocks

    def process_block(self, start: int) -> None:
        """One block, test-then-train: its test cases ranked by both arms, the drift detector fed, the
        series extended, then a training run of the worker when one is due."""
        block = self.events[start: start + self.cfg.block]
        cases = self._test_cases(start, block)
        serving, m_up, m_fr = self._evaluate_arms(cases)
        self._feed_drift_monitor(serving, cases, m_up)
        end = start + len(block)
        self.series.append({"start": start, "end": end, "cases": len(cases), "serving_version": serving,
                            "hr_updates": m_up["hr@10"], "ndcg_updates": m_up["ndcg@10"],
                            "hr_frozen": m_fr["hr@10"], "ndcg_frozen": m_fr["ndcg@10"]})
        trigger = self._maybe_retrain(end, len(block))
        if self.progress:
            p = self.series[-1]
            print(f"[{end:>5}] cases={p['cases']:3d} HR@10 updates={p['hr_updates']:.3f} frozen={p['hr_frozen']:.3f} "
                  f"serving={serving} {'run:' + self.runs[-1]['outcome'] if trigger else ''}", flush=True)

    def _test_cases(self, start: int, block: list) -> list:
        """The block's test cases: positives on items the user had not seen (all events join the histories)."""
        cases = []
        for n, e in enumerate(block):
            c = self.tracker.holdout_case(e, start + n)
            if c is not None:
                cases.append(c)
        return cases

    def _evaluate_arms(self, cases: list) -> tuple[str, dict, dict]:
        """The version serving now, and HR@10/NDCG@10 on ``cases`` of the serving (updates) and the frozen adapter."""
        from driftrec.model.training.gate import evaluate_model

        worker, max_length = self.worker, self.cfg.max_length
        serving = worker.serving_version
        m_up = evaluate_model(worker.serving_model(), worker.tokenizer, self.world.items, cases, max_length=max_length,
                              item_cache=self.serving_cache, cache_key=serving)
        m_fr = evaluate_model(self.frozen_model, worker.tokenizer, self.world.items, cases, max_length=max_length,
                              item_cache=self.frozen_cache, cache_key=self.frozen_version)
        return serving, m_up, m_fr

    def _feed_drift_monitor(self, serving: str, cases: list, m_up: dict) -> None:
        """Online signal for the drift detector: hits of the serving adapter on this block's cases."""
        if cases and not math.isnan(m_up["hr@10"]):
            hits = np.round(m_up["hr@10"] * len(cases))
            for j in range(len(cases)):
                self.worker.monitor.record(serving, 1.0 if j < hits else 0.0)

    def _maybe_retrain(self, end: int, block_len: int) -> str | None:
        """Run the worker on the newest ``cfg.window`` events after a drift detection or every
        ``cfg.every_events`` events; returns the trigger (None: no run)."""
        cfg, drift, events = self.cfg, self.drift, self.events
        self.since_run += block_len
        trigger = "drift" if drift["pending"] else ("events" if self.since_run >= cfg.every_events else None)
        if trigger and end > cfg.measure_start:
            drift["pending"] = False
            self.since_run = 0
            t1 = time.perf_counter()
            lo = max(0, end - cfg.window)
            r = self.worker.run_once(events[lo: end], trigger=trigger, context=events[max(0, lo - cfg.context): lo])
            self.train_s += time.perf_counter() - t1
            self.runs.append({"at": end, "trigger": trigger, "outcome": r.outcome, "version": r.version,
                              "examples": r.examples, "holdout": r.holdout, "seconds": round(r.seconds, 2),
                              "candidate_hr": (r.decision or {}).get("candidate", {}).get("hr@10"),
                              "serving_hr": (r.decision or {}).get("serving", {}).get("hr@10")})
        return trigger

    # ------------------------------------------------------------------------------ result

    def pre_shift_level(self, key: str) -> float:
        """The arm's mean HR@10 over the blocks that end before the shift (NaN: none)."""
        pre = [p[key] for p in self.series if p["end"] <= self.cfg.shift_at and not math.isnan(p[key])]
        return float(np.mean(pre)) if pre else float("nan")

    def result(self) -> dict[str, Any]:
        """The result dict: pre-shift levels, recovery times, the series, the training runs."""
        import torch

        cfg, series = self.cfg, self.series
        lv_up, lv_fr = self.pre_shift_level("hr_updates"), self.pre_shift_level("hr_frozen")
        return {
            "experiment": "drift",
            "config": asdict(cfg),
            "pre_shift_hr_updates": lv_up,
            "pre_shift_hr_frozen": lv_fr,
            "recovery_events_with_updates": recovery_events(series, cfg.shift_at, lv_up, cfg.recovery_frac, cfg.smooth, "hr_updates"),
            "recovery_events_frozen": recovery_events(series, cfg.shift_at, lv_fr, cfg.recovery_frac, cfg.smooth, "hr_frozen"),
            "series": series,
            "hr_series": {"event": [p["end"] for p in series], "updates": [p["hr_updates"] for p in series],
                          "frozen": [p["hr_frozen"] for p in series]},
            "runs": self.runs,
            "drift_detections": self.drift["fired"],
            "warmup": {"outcome": self.warm.outcome, "version": self.frozen_version, "seconds": round(self.warmup_s, 1)},
            "train_seconds": round(self.train_s, 1),
            "run_seconds": round(time.perf_counter() - self.t_start, 1),
            "torch_threads": torch.get_num_threads(),
        }

    def cleanup(self) -> None:
        """Remove the temporary adapter folder (when the run made one)."""
        if self.tmp is not None:
            self.tmp.cleanup()


SHIFT_TEXT = {
    "relation": "from then on a user's next item comes from a fixed derangement of the genres of their newest "
                "item, so \"items like my history\" stops being right for good",
    "taste": "every user's taste moves to other genres; histories then fill with the new genres",
}


def write_report(result: dict[str, Any], report_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    s = result["hr_series"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(s["event"], s["updates"], label="incremental updates", marker=".")
    ax.plot(s["event"], s["frozen"], label="frozen adapter", marker=".")
    ax.axvline(cfg["shift_at"], color="grey", linestyle="--", label="preference shift")
    for lvl, style in ((result["pre_shift_hr_updates"], ":"),):
        if lvl and not math.isnan(lvl):
            ax.axhline(cfg["recovery_frac"] * lvl, color="C0", linestyle=style, label=f"{cfg['recovery_frac']:.0%} of pre-shift (updates)")
    for r in result["runs"]:
        if r["outcome"] == "promoted":
            ax.axvline(r["at"], color="C2", alpha=0.15)
    ax.set_xlabel("event index")
    ax.set_ylabel(f"HR@10 per {cfg['block']}-event block")
    ax.set_title(f"Abrupt {cfg.get('shift_kind', 'taste')} shift: incremental adapter updates vs frozen adapter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = report_dir / "drift_experiment.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    def fmt(v):
        return "never" if v is None else f"{v:,} events"

    runs = result["runs"]
    kind = cfg.get("shift_kind", "taste")
    shift_text = SHIFT_TEXT.get(kind, kind)
    lines = [
        "# Drift experiment: incremental adapter updates vs frozen adapter", "",
        f"Synthetic world: {cfg['users']} users, {cfg['items']} items, abrupt shift at event {cfg['shift_at']:,} "
        f"(`shift_kind={kind}`: {shift_text}); "
        f"{cfg['post_events']:,} events after it. HR@10 per {cfg['block']}-event block (test-then-train), "
        f"recovery = first {cfg['smooth']}-block rolling HR@10 >= {cfg['recovery_frac']:.0%} of the arm's pre-shift level.", "",
        "| arm | pre-shift HR@10 | recovery after the shift |", "|---|---|---|",
        f"| incremental updates | {result['pre_shift_hr_updates']:.3f} | {fmt(result['recovery_events_with_updates'])} |",
        f"| frozen adapter | {result['pre_shift_hr_frozen']:.3f} | {fmt(result['recovery_events_frozen'])} |", "",
        f"Training runs: {len(runs)} ({sum(r['outcome'] == 'promoted' for r in runs)} promoted, "
        f"{sum(r['outcome'] == 'rejected' for r in runs)} rejected by the gate; "
        f"{sum(r['trigger'] == 'drift' for r in runs)} triggered by drift). "
        f"Every {cfg['every_events']} events, window {cfg['window']}, max_steps {cfg['max_steps']}, batch {cfg['batch_size']}, "
        f"lr {cfg['learning_rate']}.", "",
        f"Run time: {result['run_seconds']:.0f} s on {result['torch_threads']} torch thread(s) (training {result['train_seconds']:.0f} s).", "",
        f"![HR@10 series]({png.name})", "",
        "| run at event | trigger | outcome | version | candidate HR@10 | serving HR@10 |", "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ch = "" if r["candidate_hr"] is None else f"{r['candidate_hr']:.3f}"
        sh = "" if r["serving_hr"] is None else f"{r['serving_hr']:.3f}"
        lines.append(f"| {r['at']} | {r['trigger']} | {r['outcome']} | {r['version'] or ''} | {ch} | {sh} |")
    md = report_dir / "drift_experiment.md"
    md.write_text("\n".join(lines) + "\n")
    return md, png


OPTION_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "multitask": {"multitask": True},
    "adversarial": {"adversarial_eps": 1.0},
    "augment": {"augment": True, "augment_prob": 0.5},
    "all": {"multitask": True, "adversarial_eps": 1.0, "augment": True, "augment_prob": 0.5},
}


def run_options(cfg: DriftExperimentConfig, variants: dict[str, dict[str, Any]] | None = None, *, steps: int = 24,
                test_events: int = 800, repeats: int = 1) -> dict[str, Any]:
    """Effect of each training option: from the same base, train ``steps`` steps on the newest post-shift
    window, then HR@10/NDCG@10 on the following ``test_events`` (test cases as in the drift experiment)."""
    import torch

    from driftrec.model.evaluation.world import World
    from driftrec.model.training.drift_trainer import DriftTrainer
    from driftrec.model.training.gate import evaluate_model
    from driftrec.model.lm import DevicePlan, load_encoder, load_tokenizer
    from driftrec.model.training.examples import ExampleBuilder, build_training_set

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    variants = variants or OPTION_VARIANTS
    world = World(n_users=cfg.users, n_items=cfg.items, seed=cfg.seed, shift_at=cfg.shift_at, shift_kind=cfg.shift_kind)
    train_end = cfg.shift_at + cfg.window
    events = list(world.events(train_end + test_events))
    lookup = {it.item_id: it for it in world.items}.get
    base = load_encoder(None, DevicePlan(torch.device("cpu"), torch.float32))
    tok = load_tokenizer(None)
    tracker = ExampleBuilder(lookup, history_items=cfg.history_items, hard_negatives=0)
    for e in events[:train_end]:
        tracker.holdout_case(e)
    cases = [c for n, e in enumerate(events[train_end:]) if (c := tracker.holdout_case(e, train_end + n)) is not None]
    rows: dict[str, Any] = {}
    base_m = evaluate_model(base, tok, world.items, cases, max_length=cfg.max_length)
    rows["base model (no training)"] = {**base_m, "step_s": 0.0}
    for name, opts in variants.items():
        res = []
        for r in range(repeats):
            settings = _settings(cfg, Path(tempfile.gettempdir()) / "driftrec-options-unused")
            for k, v in opts.items():
                setattr(settings.trainer, k, v)
            settings.trainer.replay_buffer = 0
            trainer = DriftTrainer(settings, encoder=base, tokenizer=tok, seed=cfg.seed + r,
                                   negative_pool=[it.text() for it in world.items])
            builder = ExampleBuilder(lookup, history_items=cfg.history_items, hard_negatives=0,
                                     augment=settings.trainer.augment, augment_prob=settings.trainer.augment_prob,
                                     seed=cfg.seed + r)
            for e in events[max(0, cfg.shift_at - cfg.context): cfg.shift_at]:
                builder.holdout_case(e)
            tset = build_training_set(events[cfg.shift_at: train_end], builder, holdout_frac=0.01)
            stats = trainer.update(tset.examples, max_steps=steps)
            m = evaluate_model(trainer.model, tok, world.items, cases, max_length=cfg.max_length)
            res.append({**m, "step_s": stats.seconds / max(stats.steps, 1), "examples": len(tset.examples)})
        rows[name] = {k: float(np.mean([x[k] for x in res])) for k in res[0]}
        log.warning("options %s: %s", name, rows[name])
    return {"experiment": "options", "config": asdict(cfg), "steps": steps, "test_cases": len(cases),
            "variants": {k: v for k, v in variants.items()}, "results": rows}


def experiment_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="driftrec experiment", description="experiments on the synthetic world")
    p.add_argument("name", choices=["drift", "options"], help="drift: recovery after a shift; options: effect of each training option")
    p.add_argument("--json", required=True, help="write the result JSON here")
    p.add_argument("--report", default=None, help="write a Markdown report and a PNG plot into this folder")
    p.add_argument("--quick", action="store_true", help="a smaller world and horizon (smoke test)")
    p.add_argument("--progress", action="store_true", help="print one line per block")
    for f in ("users", "items", "seed", "shift_at", "post_events", "every_events", "max_steps", "window", "threads",
              "replay_buffer", "block", "smooth"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--shift-kind", choices=["relation", "taste"], default=None,
                   help="relation (default): the history -> next item relation changes; taste: tastes move")
    p.add_argument("--multitask", action="store_true")
    p.add_argument("--adversarial-eps", type=float, default=None)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--no-drift-trigger", action="store_true")
    p.add_argument("--steps", type=int, default=24, help="options: training steps per variant")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DriftExperimentConfig()
    if args.quick:
        cfg = DriftExperimentConfig(users=120, items=64, shift_at=700, warmup_start=300, measure_start=500,
                                    post_events=400, every_events=200, window=300, context=300, max_steps=3,
                                    warmup_steps=4, max_length=32)
    for f in ("users", "items", "seed", "shift_at", "post_events", "every_events", "max_steps", "window", "threads",
              "replay_buffer", "block", "smooth", "learning_rate", "adversarial_eps", "shift_kind"):
        v = getattr(args, f)
        if v is not None:
            setattr(cfg, f, v)
    cfg.multitask = cfg.multitask or args.multitask
    cfg.augment = cfg.augment or args.augment
    cfg.drift_trigger = cfg.drift_trigger and not args.no_drift_trigger
    if args.name == "options":
        result = run_options(cfg, steps=args.steps)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print("| option | HR@10 | NDCG@10 | s/step |\n|---|---|---|---|")
        for name, r in result["results"].items():
            print(f"| {name} | {r['hr@10']:.3f} | {r['ndcg@10']:.3f} | {r['step_s']:.2f} |")
        return 0
    result = run_experiment(cfg, progress=args.progress)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=lambda o: None))
    if args.report:
        md, png = write_report(result, Path(args.report))
        print(f"report: {md} {png}")
    print(json.dumps({k: result[k] for k in ("recovery_events_with_updates", "recovery_events_frozen",
                                              "pre_shift_hr_updates", "pre_shift_hr_frozen", "run_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(experiment_main())
