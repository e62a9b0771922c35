"""A real Prometheus scrapes a running driftrec (embedded broker, worker, scorer, demo traffic); every
PromQL expression of the dashboards and alert rules is valid and every metric it uses has data."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from driftrec.core.broker import free_port
from driftrec.testing import prometheus as promtest
from driftrec.model.evaluation.world import World
from tests.support import Proc, env_for, produce_raw, wait_until
from tests.e2e.test_streams_e2e import catalogue_records, request_records, wire

pytestmark = pytest.mark.slow


@pytest.mark.skipif(promtest.prometheus_binary() is None, reason="Debian's prometheus is not installed (.ci/run installs it)")
def test_every_dashboard_and_alert_expression_has_data(kafka):
    bootstrap, settings = kafka
    world = World(n_users=30, n_items=50, seed=23)
    produce_raw(bootstrap, catalogue_records(settings, world))
    port = free_port()
    scorer = Proc(["scorer", "--port", str(port)], env_for(settings), name="scorer")
    worker = Proc(["worker"], env_for(settings, DRIFTREC_SCORER__URL=f"http://127.0.0.1:{port}"), name="worker")
    try:
        targets = {"driftrec-worker": [f"127.0.0.1:{worker.metrics_port}"], "driftrec-scorer": [f"127.0.0.1:{port}"]}

        def ready():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200

        wait_until(ready, 180, interval=1.0, message="scorer ready")
        t = settings.topics
        traffic = [(t.clicks.name if ev.TYPE == "click" else t.ratings.name, ev.user_id.encode(), wire(ev))
                   for ev in world.events(600)]
        traffic += request_records(settings, world, 40, "prom")
        traffic.append((t.clicks.name, b"x", b"not json"))  # one dead letter
        with promtest.start_prometheus(targets, rule_files=[promtest.ALERT_RULES]) as prom:
            produce_raw(bootstrap, traffic)
            wait_until(lambda: worker.metric("driftrec_recommendations_published_total") >= 40, 120,
                       message="demo traffic answered")
            time.sleep(4)  # a few scrapes after the traffic
            produce_raw(bootstrap, request_records(settings, world, 10, "prom2", seed=4))
            time.sleep(4)
            missing = []
            for where, expr in promtest.promql_expressions_by_source():
                promtest.query(prom, expr)  # valid PromQL for a real server (raises otherwise)
                names, _ = promtest.parse_promql_names(expr)
                for name in sorted(names):
                    if name == "up":
                        continue
                    if not promtest.query(prom, f'count({{__name__="{name}"}})'):
                        missing.append(f"{where}: {name}")
            assert not missing, "metrics without data:\n" + "\n".join(sorted(set(missing)))
            up = promtest.query(prom, "up")
            assert sorted(r["metric"]["job"] for r in up if r["value"][1] == "1") == sorted(targets)
            adapters = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/adapters", timeout=5).read())
            assert adapters["domains"]["default"]["serving"]
    finally:
        worker.stop()
        scorer.stop()
