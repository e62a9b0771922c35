"""``driftrec experiment transfer``: does a new catalogue domain profit from another domain's adapter?

Two synthetic :class:`driftrec.model.evaluation.world.World` domains share the taste structure (the same eight genres,
users who like two of them) but not the words: the warm domain (``movies``) uses the default title
words/nouns/tags, the new domain (``books``) uses :data:`driftrec.model.evaluation.world.BOOK_TITLE_WORDS`,
:data:`~driftrec.model.evaluation.world.BOOK_NOUNS` and :data:`~driftrec.model.evaluation.world.BOOK_TAGS`. Users and items are
different in each domain.

1. A LoRA adapter is trained on the warm domain from plenty of events (``warm_events``) with the
   production trainer (:class:`driftrec.model.training.drift_trainer.DriftTrainer`), saved as a checkpoint and marked
   active in the :class:`driftrec.model.adapters.AdapterRegistry`.
2. The new domain is seeded from it with :meth:`AdapterRegistry.start_domain` (the production path
   for "a new domain starts from a chosen source domain's adapter").
3. The new domain has only ``N`` events. On the same held-out positives of the new domain (the
   ``test_events`` that follow the first ``max(curve)`` events; each positive on an item the user
   had not seen is ranked against the whole new-domain catalogue, seen items excluded, exactly as
   :func:`driftrec.model.training.gate.evaluate_model` does for the gate) we compare:

   * ``base``: the base model, no adapter;
   * ``scratch``: a fresh adapter fine-tuned on the first N new-domain events;
   * ``transfer``: the adapter seeded from the warm domain, fine-tuned on the same N events
     (same steps, learning rate, seed and batches as ``scratch``);
   * ``warm_only``: the warm domain's adapter with no fine-tuning.

   ``N = new_events`` is the headline table; the learning curve repeats scratch/transfer for every
   N in ``curve``. User histories of the test cases are the events before the test window (what the
   scorer would see at serving time), whatever N is, so every N is scored on identical cases.

Writes the JSON, and with ``--report DIR`` ``transfer_experiment.md``, ``transfer_experiment.png``
(bars) and ``transfer_curve.png`` (learning curve).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

ARMS = ("base", "scratch", "transfer", "warm_only")
ARM_LABELS = {
    "base": "base model (no adapter)",
    "scratch": "new adapter from scratch, fine-tuned",
    "transfer": "warm-domain adapter, fine-tuned",
    "warm_only": "warm-domain adapter, no fine-tuning",
}


@dataclass
class TransferConfig:
    warm_domain: str = "movies"
    new_domain: str = "books"
    warm_users: int = 300
    new_users: int = 100
    items: int = 150  # per domain
    seed: int = 11
    warm_events: int = 3000
    warm_steps: int = 60
    new_events: int = 200  # the headline comparison
    curve: list[int] = field(default_factory=lambda: [50, 100, 200, 400])
    test_events: int = 600
    max_steps: int = 50  # cap per fine-tuning run (Trainer.update also stops after ~2 passes over the data)
    batch_size: int = 16
    learning_rate: float = 2e-3
    negatives: int = 8
    max_length: int = 64
    history_items: int = 10
    repeats: int = 1  # fine-tuning seeds per (arm, N); the mean is reported
    threads: int = 1


def _settings(cfg: TransferConfig, adapter_dir: Path):
    from driftrec.core.settings import Settings

    return Settings(
        model={"adapter_dir": str(adapter_dir), "device": "cpu", "max_length": cfg.max_length},
        trainer={
            "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
            "replay_buffer": 0, "negatives": cfg.negatives, "history_items": cfg.history_items,
            "user_max_length": cfg.max_length, "item_max_length": cfg.max_length,
        },
    )


def make_worlds(cfg: TransferConfig):
    """The warm and the new domain: same genres and taste structure, other title words/nouns/tags."""
    from driftrec.model.evaluation.world import BOOK_NOUNS, BOOK_TAGS, BOOK_TITLE_WORDS, World

    warm = World(n_users=cfg.warm_users, n_items=cfg.items, seed=cfg.seed, domain=cfg.warm_domain)
    new = World(n_users=cfg.new_users, n_items=cfg.items, seed=cfg.seed + 1, domain=cfg.new_domain,
                title_words=BOOK_TITLE_WORDS, nouns=BOOK_NOUNS, tags=BOOK_TAGS)
    return warm, new


def _examples(events: Sequence[Any], items, cfg: TransferConfig) -> list:
    from driftrec.model.training.examples import ExampleBuilder

    lookup = {it.item_id: it for it in items}.get
    builder = ExampleBuilder(lookup, history_items=cfg.history_items, hard_negatives=0)
    out = []
    for e in events:
        out.extend(builder.add(e, train=True))
    return out


def _cases(events: Sequence[Any], items, cfg: TransferConfig, start: int) -> list:
    """Held-out positives of ``events[start:]``; ``events[:start]`` only fill the users' histories."""
    from driftrec.model.training.examples import ExampleBuilder

    lookup = {it.item_id: it for it in items}.get
    tracker = ExampleBuilder(lookup, history_items=cfg.history_items, hard_negatives=0)
    for e in events[:start]:
        tracker.holdout_case(e)
    return [c for n, e in enumerate(events[start:]) if (c := tracker.holdout_case(e, start + n)) is not None]


def _fine_tune(settings, base, tok, examples, items, seed: int, init_path: Path | None, adapter_dir: Path,
               max_steps: int | None = None):
    from driftrec.model.training.drift_trainer import DriftTrainer

    trainer = DriftTrainer(settings, encoder=base, tokenizer=tok, seed=seed,
                           negative_pool=[it.text() for it in items])
    if init_path is not None:
        trainer.load_adapter(init_path, adapter_dir)
    stats = trainer.update(examples, max_steps=max_steps) if examples else None
    return trainer, stats


def run_transfer(cfg: TransferConfig, *, adapter_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its result dict."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _TransferRun(cfg, adapter_dir, progress=progress)
    warm = run.train_warm_adapter()
    new_events, cases = run.new_domain_test_cases()
    results = run.evaluate_without_fine_tuning(warm, cases)
    points = run.learning_curve(new_events, cases, warm.seed_path)
    run.add_headline(results, points, len(cases))
    out = run.result(warm, results, points, len(cases))
    run.cleanup()
    return out


@dataclass
class _WarmAdapter:
    """The warm domain's adapter and how it was trained (step 1 of the experiment)."""

    trainer: Any  # dropped (None) once it is no longer needed
    events: int
    examples: int
    steps: int
    train_seconds: float
    in_domain: dict[str, dict[str, float]]
    test_cases: int
    seed_path: Path  # the new domain's adapter, seeded from this one


class _TransferRun:
    """The state of one run: timers, adapter folder, settings, base model, tokenizer and both worlds."""

    def __init__(self, cfg: TransferConfig, adapter_dir: Path | None, *, progress: bool) -> None:
        from driftrec.model.lm import DevicePlan, load_encoder, load_tokenizer
        import torch

        self.cfg = cfg
        self.progress = progress
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.tmp = None
        if adapter_dir is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="driftrec-transfer-")
            adapter_dir = Path(self.tmp.name)
        self.adapter_dir = adapter_dir
        self.settings = _settings(cfg, adapter_dir)
        self.base = load_encoder(None, DevicePlan(torch.device("cpu"), torch.float32))
        self.tok = load_tokenizer(None)
        self.warm_world, self.new_world = make_worlds(cfg)
        self.curve = sorted({int(n) for n in cfg.curve} | {int(cfg.new_events)})
        self.max_n = max(self.curve)
        self.ft_seconds = 0.0

    def say(self, msg: str) -> None:
        """Log a stage's outcome (and print it, with the elapsed time, when ``progress``)."""
        log.info(msg)
        if self.progress:
            print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", flush=True)

    def evaluate(self, model, items, cases) -> dict[str, float]:
        """HR@10 / NDCG@10 of ``model`` on ``cases``, ranked against ``items`` (the gate's evaluation)."""
        from driftrec.model.training.gate import evaluate_model

        return evaluate_model(model, self.tok, items, cases, max_length=self.cfg.max_length)

    def fine_tune(self, examples, items, seed: int, init_path: Path | None, max_steps: int | None = None):
        """A trainer (from ``init_path``'s adapter, else a fresh one) fine-tuned on ``examples``, and its stats."""
        return _fine_tune(self.settings, self.base, self.tok, examples, items, seed, init_path, self.adapter_dir,
                          max_steps=max_steps)

    # ------------------------------------------------------------------------------ steps

    def train_warm_adapter(self) -> _WarmAdapter:
        """Step 1: train the warm domain's adapter, measure it in its own domain, save it as the active
        version and seed the new domain from it."""
        from driftrec.model.adapters import AdapterRegistry

        cfg, world = self.cfg, self.warm_world
        warm_events = list(world.events(cfg.warm_events))
        n_warm_hold = max(1, cfg.warm_events // 10)
        warm_train = _examples(warm_events[:-n_warm_hold], world.items, cfg)
        warm_cases = _cases(warm_events, world.items, cfg, len(warm_events) - n_warm_hold)
        t0 = time.perf_counter()
        trainer, stats = self.fine_tune(warm_train, world.items, cfg.seed, None, max_steps=cfg.warm_steps)
        steps = stats.steps if stats else 0
        train_s = time.perf_counter() - t0
        in_domain = {"base": self.evaluate(self.base, world.items, warm_cases),
                     "adapter": self.evaluate(trainer.model, world.items, warm_cases)}
        warm_path = trainer.save(self.adapter_dir, cfg.warm_domain, "v1", {
            "training_window": {"events": len(warm_events) - n_warm_hold},
            "metrics": {"hr@10": in_domain["adapter"]["hr@10"], "ndcg@10": in_domain["adapter"]["ndcg@10"]},
        })
        registry = AdapterRegistry(self.adapter_dir)
        registry.mark_active(cfg.warm_domain, "v1")
        seed_path = registry.start_domain(cfg.new_domain, cfg.warm_domain)
        self.say(f"warm adapter {warm_path.name}: {len(warm_train)} examples, {steps} steps "
                 f"in {train_s:.0f}s; in-domain HR@10 base {in_domain['base']['hr@10']:.3f} -> "
                 f"adapter {in_domain['adapter']['hr@10']:.3f}; new domain seeded at {seed_path.name}")
        return _WarmAdapter(trainer=trainer, events=len(warm_events) - n_warm_hold, examples=len(warm_train),
                            steps=steps, train_seconds=train_s, in_domain=in_domain, test_cases=len(warm_cases),
                            seed_path=seed_path)

    def new_domain_test_cases(self) -> tuple[list, list]:
        """Step 2: the new domain's events and its fixed held-out cases after the first ``max(curve)`` events."""
        new_events = list(self.new_world.events(self.max_n + self.cfg.test_events))
        cases = _cases(new_events, self.new_world.items, self.cfg, self.max_n)
        return new_events, cases

    def evaluate_without_fine_tuning(self, warm: _WarmAdapter, cases: list) -> dict[str, Any]:
        """The arms with no new-domain training: ``base`` and ``warm_only`` (then the warm trainer is dropped)."""
        items = self.new_world.items
        results: dict[str, Any] = {}
        results["base"] = self.evaluate(self.base, items, cases)
        results["warm_only"] = self.evaluate(warm.trainer.model, items, cases)
        warm.trainer = None
        self.say(f"new domain: {len(cases)} test cases; base HR@10 {results['base']['hr@10']:.3f}, "
                 f"warm adapter (no fine-tuning) {results['warm_only']['hr@10']:.3f}")
        return results

    def learning_curve(self, new_events: list, cases: list, seed_path: Path) -> list[dict[str, Any]]:
        """Step 3: for every N of the curve, ``scratch`` and ``transfer`` fine-tuned on the first N events."""
        items = self.new_world.items
        points: list[dict[str, Any]] = []
        for n in self.curve:
            examples = _examples(new_events[:n], items, self.cfg)
            row: dict[str, Any] = {"events": n, "examples": len(examples),
                                   "positives": sum(1 for x in examples if x.positive)}
            for arm, init in (("scratch", None), ("transfer", seed_path)):
                row[arm] = self.fine_tuned_arm(examples, cases, init)
            points.append(row)
            self.say(f"N={n:4d} events ({row['examples']} examples, {row['positives']} positive): HR@10 scratch "
                     f"{row['scratch']['hr@10']:.3f} transfer {row['transfer']['hr@10']:.3f} "
                     f"({row['transfer']['steps']} steps)")
        return points

    def fine_tuned_arm(self, examples: list, cases: list, init: Path | None) -> dict[str, Any]:
        """One arm at one N: ``cfg.repeats`` fine-tuning runs (seeds ``seed + 100 + r``), their mean metrics."""
        items = self.new_world.items
        runs = []
        for r in range(max(1, self.cfg.repeats)):
            t1 = time.perf_counter()
            trainer, stats = self.fine_tune(examples, items, self.cfg.seed + 100 + r, init)
            dt = time.perf_counter() - t1
            self.ft_seconds += dt
            m = self.evaluate(trainer.model, items, cases)
            runs.append({**m, "steps": stats.steps if stats else 0, "train_s": round(dt, 1),
                         "loss_first": stats.loss_first if stats else None,
                         "loss_last": stats.loss_last if stats else None})
            del trainer
        return {"hr@10": float(np.mean([x["hr@10"] for x in runs])),
                "ndcg@10": float(np.mean([x["ndcg@10"] for x in runs])),
                "steps": runs[0]["steps"], "runs": runs}

    def add_headline(self, results: dict[str, Any], points: list[dict[str, Any]], n_cases: int) -> None:
        """The headline table: ``scratch`` and ``transfer`` at ``N = new_events``, every arm with its case count."""
        head = next(p for p in points if p["events"] == self.cfg.new_events)
        results["scratch"] = {k: head["scratch"][k] for k in ("hr@10", "ndcg@10", "steps")}
        results["transfer"] = {k: head["transfer"][k] for k in ("hr@10", "ndcg@10", "steps")}
        for arm in ARMS:
            results[arm]["n"] = n_cases

    def result(self, warm: _WarmAdapter, results: dict[str, Any], points: list[dict[str, Any]],
               n_cases: int) -> dict[str, Any]:
        """The result dict (what the JSON holds)."""
        import torch

        cfg = self.cfg
        return {
            "experiment": "transfer",
            "config": asdict(cfg),
            "warm_domain": {"domain": cfg.warm_domain, "events": warm.events,
                            "examples": warm.examples, "steps": warm.steps,
                            "train_seconds": round(warm.train_seconds, 1), "in_domain": warm.in_domain,
                            "test_cases": warm.test_cases},
            "new_domain": {"domain": cfg.new_domain, "events": cfg.new_events, "test_cases": n_cases,
                           "test_events": cfg.test_events, "seeded_from": warm.seed_path.name},
            "results": results,
            "curve": points,
            "fine_tune_seconds": round(self.ft_seconds, 1),
            "run_seconds": round(time.perf_counter() - self.t_start, 1),
            "cpu_seconds": round(time.process_time() - self.cpu_start, 1),  # the machine is shared: wall time varies
            "torch_threads": torch.get_num_threads(),
        }

    def cleanup(self) -> None:
        """Remove the temporary adapter folder (when the run made one)."""
        if self.tmp is not None:
            self.tmp.cleanup()


def write_report(result: dict[str, Any], report_dir: Path) -> tuple[Path, Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    res = result["results"]
    n_new = cfg["new_events"]

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(ARMS))
    hr = [res[a]["hr@10"] for a in ARMS]
    nd = [res[a]["ndcg@10"] for a in ARMS]
    b1 = ax.bar(x - 0.2, hr, 0.4, label="HR@10")
    b2 = ax.bar(x + 0.2, nd, 0.4, label="NDCG@10")
    for bars in (b1, b2):
        for b in bars:
            ax.annotate(f"{b.get_height():.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [ARM_LABELS[a].replace(", ", ",\n") for a in ARMS], fontsize=8)
    ax.set_ylabel("metric on new-domain held-out positives")
    ax.set_title(f"New domain '{cfg['new_domain']}' with {n_new} events "
                 f"({result['new_domain']['test_cases']} test cases, {cfg['items']} items)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    bars_png = report_dir / "transfer_experiment.png"
    fig.savefig(bars_png, dpi=110)
    plt.close(fig)

    pts = result["curve"]
    ns = [p["events"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ns, [p["transfer"]["hr@10"] for p in pts], marker="o", label="transfer (warm adapter + fine-tune)")
    ax.plot(ns, [p["scratch"]["hr@10"] for p in pts], marker="o", label="scratch (new adapter + fine-tune)")
    ax.axhline(res["base"]["hr@10"], color="grey", linestyle="--", label="base model")
    ax.axhline(res["warm_only"]["hr@10"], color="C2", linestyle=":", label="warm adapter, no fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("new-domain training events")
    ax.set_ylabel("HR@10 (same held-out cases)")
    ax.set_title("Learning curve on the new domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curve_png = report_dir / "transfer_curve.png"
    fig.savefig(curve_png, dpi=110)
    plt.close(fig)

    wd = result["warm_domain"]
    lines = [
        "# Cross-domain transfer: a new domain starting from another domain's adapter", "",
        f"Synthetic worlds: warm domain `{cfg['warm_domain']}` ({cfg['warm_users']} users, {cfg['items']} items) and new "
        f"domain `{cfg['new_domain']}` ({cfg['new_users']} users, {cfg['items']} items). Both share the eight genres and "
        "the taste structure; title words, nouns and tags differ per domain, users and items are disjoint.", "",
        f"Warm adapter: {wd['examples']} examples from {wd['events']} events, {wd['steps']} steps "
        f"({wd['train_seconds']:.0f} s); in its own domain HR@10 {wd['in_domain']['base']['hr@10']:.3f} (base) -> "
        f"{wd['in_domain']['adapter']['hr@10']:.3f} (adapter) on {wd['test_cases']} held-out positives.", "",
        f"New domain: the first N events train; the next {cfg['test_events']} events give "
        f"{result['new_domain']['test_cases']} held-out positives (unseen items ranked against the whole new-domain "
        f"catalogue, seen items excluded). Fine-tuning: lr {cfg['learning_rate']}, batch {cfg['batch_size']}, "
        f"{cfg['negatives']} sampled negatives, about two passes over the data (at most {cfg['max_steps']} steps), "
        f"{cfg['repeats']} seed(s); scratch and transfer see identical batches.", "",
        f"## N = {n_new} new-domain events", "",
        "| arm | new-domain events used | HR@10 | NDCG@10 | fine-tuning steps |", "|---|---|---|---|---|",
    ]
    used = {"base": 0, "scratch": n_new, "transfer": n_new, "warm_only": 0}
    for a in ARMS:
        steps = res[a].get("steps", 0)
        lines.append(f"| {ARM_LABELS[a]} | {used[a]} | {res[a]['hr@10']:.3f} | {res[a]['ndcg@10']:.3f} | {steps} |")
    n_cases = max(1, result["new_domain"]["test_cases"])
    p0 = res["base"]["hr@10"]
    se = math.sqrt(max(p0 * (1 - p0), 1e-12) / n_cases)
    lines += ["", f"Sampling noise: with {n_cases} test cases the standard error of one HR@10 near {p0:.2f} is about "
              f"{se:.3f}, so differences below ~{2 * se:.2f} are within noise (the arms share the cases, "
              "so this is conservative for a paired comparison, but training-seed noise comes on top).", ""]
    lines += ["", f"![bars]({bars_png.name})", "", "## Learning curve (HR@10 / NDCG@10)", "",
              "| new-domain events | examples | scratch HR@10 | transfer HR@10 | scratch NDCG@10 | transfer NDCG@10 | steps |",
              "|---|---|---|---|---|---|---|"]
    for p in pts:
        lines.append(f"| {p['events']} | {p['examples']} | {p['scratch']['hr@10']:.3f} | {p['transfer']['hr@10']:.3f} | "
                     f"{p['scratch']['ndcg@10']:.3f} | {p['transfer']['ndcg@10']:.3f} | {p['transfer']['steps']} |")
    lines += ["", f"Base model HR@10 {res['base']['hr@10']:.3f}; warm adapter without fine-tuning "
              f"{res['warm_only']['hr@10']:.3f}.", "", f"![curve]({curve_png.name})", "",
              f"Run time: {result['run_seconds']:.0f} s wall, {result.get('cpu_seconds', float('nan')):.0f} s CPU, "
              f"on {result['torch_threads']} torch thread(s) (fine-tuning {result['fine_tune_seconds']:.0f} s wall).", ""]
    md = report_dir / "transfer_experiment.md"
    md.write_text("\n".join(lines))
    return md, bars_png, curve_png


QUICK = dict(warm_users=40, new_users=20, items=32, warm_events=300, warm_steps=4, new_events=40, curve=[20, 40],
             test_events=120, max_steps=3, batch_size=8, max_length=32, negatives=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftrec experiment transfer",
                                description="cross-domain transfer: a new domain starting from another domain's adapter")
    p.add_argument("--json", required=True, help="write the result JSON here")
    p.add_argument("--report", default=None, help="write a Markdown report and PNG plots into this folder")
    p.add_argument("--quick", action="store_true", help="a tiny world (smoke test, ~1 min)")
    p.add_argument("--progress", action="store_true", help="print one line per stage")
    for f in ("warm_users", "new_users", "items", "seed", "warm_events", "warm_steps", "new_events", "test_events",
              "max_steps", "batch_size", "negatives", "max_length", "repeats", "threads"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--curve", default=None, help="comma-separated new-domain event counts, e.g. 50,100,200,400")
    return p


def transfer_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "transfer":  # tolerate `experiment transfer ...` passed through whole
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TransferConfig(**QUICK) if args.quick else TransferConfig()
    for f in ("warm_users", "new_users", "items", "seed", "warm_events", "warm_steps", "new_events", "test_events",
              "max_steps", "batch_size", "negatives", "max_length", "repeats", "threads", "learning_rate"):
        v = getattr(args, f)
        if v is not None:
            setattr(cfg, f, v)
    if args.curve:
        cfg.curve = [int(x) for x in args.curve.split(",") if x.strip()]
    result = run_transfer(cfg, progress=args.progress)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=lambda o: None))
    if args.report:
        md, bars, curve = write_report(result, Path(args.report))
        print(f"report: {md} {bars} {curve}")
    res = result["results"]
    print(f"| arm ({cfg.new_events} new-domain events) | HR@10 | NDCG@10 |\n|---|---|---|")
    for a in ARMS:
        print(f"| {ARM_LABELS[a]} | {res[a]['hr@10']:.3f} | {res[a]['ndcg@10']:.3f} |")
    print(f"run_seconds {result['run_seconds']} cpu_seconds {result['cpu_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(transfer_main())
