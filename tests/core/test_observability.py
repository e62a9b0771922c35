"""driftrec.core.metrics, the generated Grafana dashboards, and every PromQL expression we ship."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from driftrec.core import metrics
from driftrec.testing import prometheus as promtest

REPO = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "dashboards" / "grafana"
PROVISIONING = REPO / "dashboards" / "provisioning"

ALLOWED_NON_DRIFTREC = {"up"}
# Label names a metric may carry: each takes values from a small fixed set.
ALLOWED_LABELS = {
    "event_type", "outcome", "reason", "agent", "store", "feature_view", "topic", "domain",
    "endpoint", "status", "source", "detector", "version", "decision", "model",
}
FORBIDDEN_LABEL_WORDS = ("user", "item", "request_id", "session", "id")


def _generator():
    spec = importlib.util.spec_from_file_location("driftrec_dashboards_generate", REPO / "dashboards" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DIR.glob("*.json"))}


# ------------------------------------------------------------------------------------ metrics


def test_metric_naming_rules():
    defined = metrics.all_metrics()
    assert len(defined) >= 25
    names = [m._name for m in defined.values()]
    assert len(names) == len(set(names)), "a metric name is defined twice"
    for py_name, metric in defined.items():
        name = metric._name
        assert py_name.isupper(), py_name
        assert name.startswith("driftrec_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert not re.search(r"_(ms|milliseconds|us|minutes|hours|mb|kb|bytes_total_bytes)$|_ms_", name), name
        if isinstance(metric, Counter):
            assert not name.endswith("_total"), f"{name}: prometheus_client adds _total itself"
        if isinstance(metric, Histogram):
            assert not name.endswith(("_total", "_count", "_sum", "_bucket")), name
        if isinstance(metric, Gauge) and name.endswith("_info"):
            assert set(metric._labelnames) <= ALLOWED_LABELS
        assert metric._documentation.strip(), f"{name} has no help text"
        for label in metric._labelnames:
            assert label in ALLOWED_LABELS, f"{name}: label {label!r} is not in the allowed fixed-set labels"
            assert not any(label == w or label.startswith(w + "_") or label.endswith("_" + w) for w in FORBIDDEN_LABEL_WORDS), label


def test_required_metrics_exist():
    exported = metrics.exported_sample_names()
    required = {
        "driftrec_events_ingested_total", "driftrec_dead_letters_total",
        "driftrec_agent_processing_seconds_bucket", "driftrec_feature_freshness_seconds_bucket",
        "driftrec_feature_newest_event_lag_seconds", "driftrec_feature_rows_written_total",
        "driftrec_consumer_lag_messages", "driftrec_scoring_latency_seconds_bucket",
        "driftrec_scoring_queue_seconds_bucket", "driftrec_scorer_requests_total",
        "driftrec_event_to_recommendation_seconds_bucket", "driftrec_recommendations_published_total",
        "driftrec_recommendation_fallbacks_total", "driftrec_candidates_total", "driftrec_correction_error",
        "driftrec_drift_detections_total", "driftrec_adapter_active_info", "driftrec_adapter_swaps_total",
        "driftrec_checkpoint_rejections_total", "driftrec_rollbacks_total",
        "driftrec_trainer_step_seconds_bucket", "driftrec_trainer_runs_total", "driftrec_gate_decisions_total",
        "driftrec_online_hr_at_10", "driftrec_online_ndcg_at_10", "driftrec_build_info",
    }
    assert required <= exported, sorted(required - exported)


def test_histogram_buckets_fit_their_use():
    assert 0.25 in metrics.FRESHNESS_BUCKETS, "the 250 ms freshness SLO must be a bucket boundary"
    assert max(metrics.FRESHNESS_BUCKETS) >= 30
    assert min(metrics.SCORING_BUCKETS) <= 0.001 and max(metrics.SCORING_BUCKETS) <= 5
    for buckets in (metrics.LATENCY_FAST_BUCKETS, metrics.SCORING_BUCKETS, metrics.FRESHNESS_BUCKETS,
                    metrics.TRAINER_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    upper = {m._name: m._upper_bounds for m in metrics.all_metrics().values() if isinstance(m, Histogram)}
    assert 0.25 in upper["driftrec_feature_freshness_seconds"]
    assert upper["driftrec_scoring_latency_seconds"][:-1] == list(metrics.SCORING_BUCKETS)


def test_exposition_and_helpers():
    metrics.EVENTS_INGESTED.labels(event_type="click", outcome="ok").inc()
    metrics.DEAD_LETTERS.labels(reason="schema").inc()
    metrics.FEATURE_FRESHNESS_SECONDS.labels(store="sqlite", feature_view="user_features").observe(0.03)
    metrics.set_active_adapter("test-domain", "v1")
    metrics.set_active_adapter("test-domain", "v2")
    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        metrics.stop_metrics_servers()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "driftrec_events_ingested" in families
    build = [s for s in families["driftrec_build_info"].samples]
    assert build and build[0].labels["version"]
    adapter = [s.labels for s in families["driftrec_adapter_active_info"].samples
               if s.labels.get("domain") == "test-domain"]
    assert adapter == [{"domain": "test-domain", "version": "v2"}], "the old version's series must go"
    # every exposed driftrec sample is one the dashboards' checks know about
    exported = metrics.exported_sample_names()
    for family in families.values():
        for sample in family.samples:
            if sample.name.startswith("driftrec_"):
                assert sample.name in exported, sample.name


def test_aiohttp_metrics_handler():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> tuple[int, str, str]:
        app = web.Application()
        app.router.add_get("/metrics", metrics.aiohttp_metrics_handler)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/metrics")
            return resp.status, resp.headers["Content-Type"], await resp.text()

    metrics.SCORER_REQUESTS.labels(endpoint="score", status="200").inc()
    status, content_type, body = asyncio.run(run())
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain")
    assert 'driftrec_scorer_requests_total{endpoint="score",status="200"}' in body


# --------------------------------------------------------------------------------- dashboards


def test_committed_dashboards_match_generator():
    gen = _generator()
    rendered = gen.rendered()
    assert {p.name for p in rendered} == {"pipeline.json", "serving.json", "model.json"}
    for path, text in rendered.items():
        assert path.is_file(), f"{path} missing: run python dashboards/generate.py"
        assert path.read_text() == text, f"{path.name} is stale: run python dashboards/generate.py"
    assert gen.main(["--check"]) == 0


def test_dashboards_are_valid():
    gen = _generator()
    dashboards = _dashboards()
    assert set(dashboards) == {"pipeline.json", "serving.json", "model.json"}
    uids = [d["uid"] for d in dashboards.values()]
    assert len(uids) == len(set(uids))
    for name, dash in dashboards.items():
        assert dash["title"] and dash["panels"], name
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert all(isinstance(i, int) and i > 0 for i in ids)
        for panel in dash["panels"]:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, (name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${%s}" % gen.DS_VARIABLE}
            assert panel["targets"], (name, panel["title"])
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids))
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert target["expr"].strip()
                assert "$" not in target["expr"], "keep expressions plain PromQL (no Grafana variables)"


def test_dashboards_cover_the_brief():
    text = {name: json.dumps(d) for name, d in _dashboards().items()}
    for needle in ("driftrec_events_ingested_total", "driftrec_consumer_lag_messages",
                   "driftrec_dead_letters_total", "driftrec_feature_freshness_seconds_bucket"):
        assert needle in text["pipeline.json"], needle
    for needle in ("driftrec_scoring_latency_seconds_bucket", "driftrec_scoring_queue_seconds_bucket",
                   "driftrec_scorer_requests_total", "driftrec_recommendation_fallbacks_total",
                   "driftrec_adapter_active_info", "driftrec_adapter_swaps_total",
                   "driftrec_checkpoint_rejections_total"):
        assert needle in text["serving.json"], needle
    for needle in ("driftrec_correction_error", "driftrec_drift_detections_total", "driftrec_gate_decisions_total",
                   "driftrec_rollbacks_total", "driftrec_online_hr_at_10", "driftrec_online_ndcg_at_10",
                   "driftrec_trainer_step_seconds_bucket"):
        assert needle in text["model.json"], needle


def _datasource_refs(node, path="$"):
    """(json path, value) of every ``datasource`` reference anywhere in a dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from _datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_refs(value, f"{path}[{i}]")


GRAFANA_BUILTIN = {"type": "grafana", "uid": "-- Grafana --"}  # the built-in annotations source


def test_dashboards_are_importable_anywhere():
    """__inputs + a datasource variable used everywhere + no datasource uid baked in."""
    for name, dash in _dashboards().items():
        [ds_input] = dash["__inputs"]
        assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["type"] == "datasource"
        assert ds_input["pluginId"] == "prometheus"
        required = {(r["type"], r["id"]) for r in dash["__requires"]}
        assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required, name
        used_panels = {p["type"] for p in dash["panels"] if p["type"] != "row"}
        assert used_panels == {i for t, i in required if t == "panel"}, name

        variables = {v["name"]: v for v in dash["templating"]["list"]}
        var = variables["datasource"]
        assert var["type"] == "datasource" and var["query"] == "prometheus", name
        # the import form writes the chosen datasource's uid here
        assert var["current"]["value"] == "${DS_PROMETHEUS}", name
        # every reference, anywhere in the JSON (panels, targets, annotations), goes through the variable
        refs = list(_datasource_refs(dash))
        assert len(refs) > len(dash["panels"]), name
        for where, ref in refs:
            if ref == GRAFANA_BUILTIN:
                continue
            assert ref == {"type": "prometheus", "uid": "${datasource}"}, f"{name} {where}: {ref}"
        text = json.dumps(dash)
        assert "${DS_PROMETHEUS}" in text and text.count("${DS_PROMETHEUS}") == 1, name
        # the only uids: the dashboard's own, derived from its file name, and the variable / built-in refs
        assert dash["uid"] == "driftrec-" + Path(name).stem
        uids = set(re.findall(r'"uid": "([^"]*)"', text))
        assert uids <= {dash["uid"], "${datasource}", "-- Grafana --"}, f"{name}: hard-coded uid(s) {uids}"


def test_generator_writes_no_datasource_uid():
    gen = _generator()
    assert not hasattr(gen, "DATASOURCE_UID")
    assert gen.DATASOURCE == {"type": "prometheus", "uid": "${datasource}"}
    for name, build in gen.DASHBOARDS.items():
        dash = build()
        assert dash["uid"] == gen.UID_PREFIX + name
        for _, ref in _datasource_refs(dash):
            assert ref in (gen.DATASOURCE, GRAFANA_BUILTIN), (name, ref)


def test_grafana_provisioning_matches_dashboards():
    import yaml

    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [source] = ds["datasources"]
    # provisioned, the dashboards' unresolved ${DS_PROMETHEUS} falls back to the first Prometheus
    # datasource: keep this the only one (and the default), whatever its uid
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    if source.get("uid"):
        for dash in _dashboards().values():
            assert source["uid"] not in json.dumps(dash), "the dashboards must not name the provisioned uid"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "driftrec.yaml").read_text())
    [provider] = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


# ---------------------------------------------------------------------------- PromQL metrics


def test_promql_parser():
    m, f = promtest.parse_promql_names(
        'histogram_quantile(0.99, sum by (le, store) (rate(driftrec_x_bucket{store="redis",a=~"b|c"}[5m])))'
        " > 0.25 and on (store) up offset 10m or vector(1e-9)"
    )
    assert m == {"driftrec_x_bucket", "up"}
    assert f == {"histogram_quantile", "sum", "rate", "vector"}


def test_every_promql_metric_is_exported():
    exported = metrics.exported_sample_names() | ALLOWED_NON_DRIFTREC
    sources = list(promtest.promql_expressions_by_source())
    assert len(sources) >= 30
    assert any("alerts.yml" in where for where, _ in sources)
    used: set[str] = set()
    for where, expr in sources:
        names, functions = promtest.parse_promql_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by driftrec.core.metrics (expr {expr!r})"
        assert functions <= promtest.PROMQL_FUNCTIONS, f"{where}: unknown function {functions - promtest.PROMQL_FUNCTIONS}"
        used |= names
    # histogram_quantile only over _bucket series, rate/increase only over counters or buckets
    for where, expr in sources:
        for fn, arg in re.findall(r"\b(rate|increase)\((\w+)", expr):
            assert arg.endswith(("_total", "_bucket", "_sum", "_count")), f"{where}: {fn}() over non-counter {arg}"
    assert "driftrec_feature_freshness_seconds_bucket" in used


def test_all_promql_expressions_helper():
    exprs = list(promtest.all_promql_expressions())
    assert len(exprs) == len(list(promtest.promql_expressions_by_source()))
    assert any("up{" in e or e.startswith("up") for e in exprs)


# ------------------------------------------------------------------------- real Prometheus


@pytest.mark.skipif(promtest.prometheus_binary() is None,
                    reason="prometheus binary not installed (apt-get install prometheus)")
def test_real_prometheus_scrapes_driftrec_metrics():
    metrics.EVENTS_INGESTED.labels(event_type="rating", outcome="ok").inc(3)
    metrics.FEATURE_FRESHNESS_SECONDS.labels(store="redis", feature_view="item_features").observe(0.02)
    metrics.SCORING_LATENCY_SECONDS.labels(domain="default").observe(0.012)
    metrics.set_active_adapter("default", "v7")
    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        with promtest.start_prometheus([f"127.0.0.1:{port}"], rule_files=[promtest.ALERT_RULES]) as prom:
            up = promtest.wait_for_query(prom, 'up{job="driftrec"} == 1', timeout_s=30)
            assert promtest.sample_values(up) == [1.0]
            result = promtest.wait_for_query(
                prom, 'driftrec_events_ingested_total{event_type="rating",outcome="ok"}', timeout_s=30
            )
            assert promtest.sample_values(result)[0] >= 3
            adapter = promtest.query(prom, 'driftrec_adapter_active_info{domain="default"}')
            assert [r["metric"]["version"] for r in adapter] == ["v7"]
            # Every dashboard/alert expression must be valid PromQL for a real server.
            for where, expr in promtest.promql_expressions_by_source():
                promtest.query(prom, expr)  # raises on a parse error
            with pytest.raises(RuntimeError, match="parse"):
                promtest.query(prom, "sum(rate(driftrec_events_ingested_total[1m])")
    finally:
        metrics.stop_metrics_servers()
