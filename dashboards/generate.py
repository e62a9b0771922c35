"""Generate driftrec's Grafana dashboards (``dashboards/grafana/*.json``) from code.

    python dashboards/generate.py           # (re)write the JSON files
    python dashboards/generate.py --check   # exit 1 if a committed file differs from the output

The JSON is written with sorted keys and a 2-space indent so diffs stay reviewable; edit this
file, never the JSON. Every PromQL expression may only use metrics defined in
``driftrec.core.metrics`` (plus ``up``): ``tests/core/test_observability.py`` checks it.

Every dashboard imports into any Grafana (Dashboards > New > Import, upload the JSON):

* ``__inputs`` declares one datasource input, ``DS_PROMETHEUS``: the import form asks which
  Prometheus to use and writes its uid where ``${DS_PROMETHEUS}`` stands;
* that place is the current value of the ``datasource`` template variable (type ``prometheus``), and
  every panel, query and annotation names ``${datasource}``, never a datasource uid, so the
  dashboards also switch between Prometheus servers from the variable's drop-down;
* the compose stack provisions the same files (dashboards/provisioning): provisioning skips the
  import step, so ``${DS_PROMETHEUS}`` stays unresolved and Grafana falls back to the first
  Prometheus datasource, the one provisioned there;
* a dashboard's uid is derived from its file name: ``driftrec-<name>`` (``driftrec-pipeline`` for
  ``pipeline.json``), in driftrec's own prefix so it does not collide with other dashboards while
  links to a dashboard stay stable across imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "grafana"
DS_INPUT = "DS_PROMETHEUS"  # the import form's datasource input
DS_VARIABLE = "datasource"  # the template variable every panel and query reads its datasource from
DATASOURCE = {"type": "prometheus", "uid": "${%s}" % DS_VARIABLE}
UID_PREFIX = "driftrec-"
DASHBOARD_TAGS = ["driftrec"]
MIN_GRAFANA_VERSION = "10.0.0"  # schemaVersion 39
PANEL_NAMES = {"timeseries": "Time series", "stat": "Stat", "table": "Table"}  # for __requires

# Rate window for counters/histograms. Fixed (not $__rate_interval) so the expressions are plain
# PromQL that tests can run against a real Prometheus.
W = "1m"
W_SLOW = "5m"


def _q(q: float, metric: str, by: str = "", window: str = W_SLOW, where: str = "") -> str:
    labels = "le" + (f", {by}" if by else "")
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{where}[{window}])))"


class Dashboard:
    """Lays panels out left to right on Grafana's 24-column grid, wrapping into new rows."""

    def __init__(self, name: str, title: str, description: str) -> None:
        self.uid = UID_PREFIX + name
        self.title = title
        self.description = description
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "id": len(self.panels) + 1,
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x = 0
            self._row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self._x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        description: str = "",
        w: int = 12,
        h: int = 8,
        instant: bool = False,
        thresholds: list[tuple[float | None, str]] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        stack: bool = False,
    ) -> None:
        ref_ids = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        built_targets = []
        for i, (expr, legend) in enumerate(targets):
            target: dict[str, Any] = {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": ref_ids[i],
            }
            if instant:
                target.update({"format": "table", "instant": True, "range": False})
            else:
                target.update({"instant": False, "range": True})
            built_targets.append(target)

        defaults: dict[str, Any] = {"unit": unit}
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        steps = thresholds or [(None, "green")]
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in steps],
        }
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 20 if stack else 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": True,
                "stacking": {"group": "A", "mode": "normal" if stack else "none"},
            }
            options: dict[str, Any] = {
                "legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom"},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        elif kind == "stat":
            options = {
                "colorMode": "value",
                "graphMode": "area",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "textMode": "auto",
            }
        elif kind == "table":
            options = {"cellHeight": "sm", "showHeader": True}
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown panel kind {kind!r}")

        panel: dict[str, Any] = {
            "datasource": DATASOURCE,
            "description": description,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "gridPos": self._place(w, h),
            "id": len(self.panels) + 1,
            "options": options,
            "targets": built_targets,
            "title": title,
            "type": kind,
        }
        if kind == "table":
            panel["transformations"] = [
                {
                    "id": "organize",
                    "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
                }
            ]
        self.panels.append(panel)

    def build(self) -> dict[str, Any]:
        panel_types = sorted({p["type"] for p in self.panels if p["type"] != "row"})
        return {
            "__inputs": [
                {
                    "description": "The Prometheus that scrapes driftrec's workers, trainer and scorer.",
                    "label": "Prometheus",
                    "name": DS_INPUT,
                    "pluginId": "prometheus",
                    "pluginName": "Prometheus",
                    "type": "datasource",
                }
            ],
            "__requires": [
                {"id": "grafana", "name": "Grafana", "type": "grafana", "version": MIN_GRAFANA_VERSION},
                {"id": "prometheus", "name": "Prometheus", "type": "datasource", "version": "1.0.0"},
                *({"id": t, "name": PANEL_NAMES[t], "type": "panel", "version": ""} for t in panel_types),
            ],
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    },
                    {
                        "datasource": DATASOURCE,
                        "enable": True,
                        "expr": "changes(driftrec_rollbacks_total[1m]) > 0",
                        "iconColor": "red",
                        "name": "Adapter rollbacks",
                        "step": "30s",
                        "titleFormat": "rollback",
                    },
                ]
            },
            "description": self.description,
            "editable": True,
            "graphTooltip": 1,
            "links": [
                {
                    "asDropdown": True,
                    "includeVars": False,
                    "keepTime": True,
                    "tags": DASHBOARD_TAGS,
                    "title": "driftrec",
                    "type": "dashboards",
                }
            ],
            "panels": self.panels,
            "refresh": "10s",
            "schemaVersion": 39,
            "tags": DASHBOARD_TAGS,
            "templating": {
                "list": [
                    {
                        "current": {"selected": False, "text": "Prometheus", "value": "${%s}" % DS_INPUT},
                        "hide": 0,
                        "includeAll": False,
                        "label": "Data source",
                        "multi": False,
                        "name": DS_VARIABLE,
                        "options": [],
                        "query": "prometheus",
                        "refresh": 1,
                        "regex": "",
                        "skipUrlSync": False,
                        "type": "datasource",
                    }
                ]
            },
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
        }


FRESHNESS_SLO = [(None, "green"), (0.25, "red")]


def pipeline() -> dict[str, Any]:
    d = Dashboard(
        "pipeline",
        "driftrec / Pipeline",
        "Kafka ingest, validation, dead letters, consumer lag and online feature freshness.",
    )
    d.row("Ingest")
    d.panel(
        "Throughput by event type",
        [(f'sum by (event_type) (rate(driftrec_events_ingested_total{{outcome="ok"}}[{W}]))', "{{event_type}}")],
        unit="ops",
        stack=True,
        description="Validated events per second, by event type.",
    )
    d.panel(
        "Ingest outcome",
        [(f"sum by (outcome) (rate(driftrec_events_ingested_total[{W}]))", "{{outcome}}")],
        unit="ops",
        stack=True,
        description="Events per second forwarded (ok) vs dead-lettered.",
    )
    d.panel(
        "Dead letters by reason",
        [(f"sum by (reason) (rate(driftrec_dead_letters_total[{W_SLOW}]))", "{{reason}}")],
        unit="ops",
        stack=True,
        description="Events sent to the dead-letter topic per second, by reason class.",
    )
    d.panel(
        "Dead-letter ratio",
        [
            (
                f'sum(rate(driftrec_events_ingested_total{{outcome="dead_lettered"}}[{W_SLOW}]))'
                f" / clamp_min(sum(rate(driftrec_events_ingested_total[{W_SLOW}])), 1e-9)",
                "dead-lettered",
            )
        ],
        unit="percentunit",
        minimum=0,
        thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
    )
    d.panel(
        "Consumer lag by topic",
        [("sum by (topic) (driftrec_consumer_lag_messages)", "{{topic}}")],
        description="Messages not yet consumed, summed over the workers' partitions.",
    )
    d.panel(
        "Agent processing time p99",
        [(_q(0.99, "driftrec_agent_processing_seconds", "agent"), "{{agent}}")],
        unit="s",
    )
    d.row("Online features")
    d.panel(
        "Feature freshness p50 / p99",
        [
            (_q(0.5, "driftrec_feature_freshness_seconds", "store"), "p50 {{store}}"),
            (_q(0.99, "driftrec_feature_freshness_seconds", "store"), "p99 {{store}}"),
        ],
        unit="s",
        thresholds=FRESHNESS_SLO,
        description="Event time to readable in the online store. SLO: p99 below 250 ms.",
    )
    d.panel(
        "Newest event lag",
        [("max by (store) (driftrec_feature_newest_event_lag_seconds)", "{{store}}")],
        unit="s",
        description="Wall clock minus the event time of the newest event written, by store.",
    )
    d.panel(
        "Feature rows written",
        [(f"sum by (store, feature_view) (rate(driftrec_feature_rows_written_total[{W}]))", "{{store}} {{feature_view}}")],
        unit="ops",
        stack=True,
    )
    d.panel(
        "Online-store write time p99",
        [(_q(0.99, "driftrec_feature_write_seconds", "store"), "{{store}}")],
        unit="s",
    )
    return d.build()


def serving() -> dict[str, Any]:
    d = Dashboard(
        "serving",
        "driftrec / Serving",
        "LM scorer latency and traffic, recommendation fallbacks, adapters in service.",
    )
    d.row("Scorer")
    d.panel(
        "Scorer up",
        [('min(up{job="scorer"})', "up")],
        kind="stat",
        w=4,
        thresholds=[(None, "red"), (1, "green")],
    )
    d.panel(
        "Scoring latency p50 / p99",
        [
            (_q(0.5, "driftrec_scoring_latency_seconds"), "p50"),
            (_q(0.99, "driftrec_scoring_latency_seconds"), "p99"),
            (_q(0.99, "driftrec_scorer_client_seconds"), "p99 round trip (client)"),
        ],
        unit="s",
        w=10,
        description="Model time per scoring request; the round trip is measured by the recommend agent.",
    )
    d.panel(
        "Scoring queue time p50 / p99",
        [
            (_q(0.5, "driftrec_scoring_queue_seconds"), "p50"),
            (_q(0.99, "driftrec_scoring_queue_seconds"), "p99"),
        ],
        unit="s",
        w=10,
    )
    d.panel(
        "Scorer requests by endpoint / status",
        [(f"sum by (endpoint, status) (rate(driftrec_scorer_requests_total[{W}]))", "{{endpoint}} {{status}}")],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Scoring latency p99 by domain",
        [(_q(0.99, "driftrec_scoring_latency_seconds", "domain"), "{{domain}}")],
        unit="s",
    )
    d.row("Recommendations")
    d.panel(
        "Recommendations published",
        [(f"sum(rate(driftrec_recommendations_published_total[{W}]))", "published")],
        unit="ops",
        w=8,
    )
    d.panel(
        "Fallbacks by reason",
        [(f"sum by (reason) (rate(driftrec_recommendation_fallbacks_total[{W}]))", "{{reason}}")],
        unit="ops",
        stack=True,
        w=8,
    )
    d.panel(
        "Fallback ratio",
        [
            (
                f"sum(rate(driftrec_recommendation_fallbacks_total[{W_SLOW}]))"
                f" / clamp_min(sum(rate(driftrec_recommendations_published_total[{W_SLOW}])), 1e-9)",
                "fallback ratio",
            )
        ],
        unit="percentunit",
        minimum=0,
        thresholds=[(None, "green"), (0.05, "orange"), (0.2, "red")],
        w=8,
    )
    d.panel(
        "Event to recommendation p50 / p99",
        [
            (_q(0.5, "driftrec_event_to_recommendation_seconds"), "p50"),
            (_q(0.99, "driftrec_event_to_recommendation_seconds"), "p99"),
        ],
        unit="s",
    )
    d.panel(
        "Candidates by source (ranking.engine: loop)",
        [(f"sum by (source) (rate(driftrec_candidates_total[{W}]))", "{{source}}")],
        unit="ops",
        stack=True,
    )
    d.panel(
        "Synchronous API: requests by status",
        [(f"sum by (status) (rate(driftrec_api_requests_total[{W}]))", "{{status}}")],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Synchronous API latency p50 / p99",
        [
            (_q(0.5, "driftrec_api_request_seconds"), "p50"),
            (_q(0.99, "driftrec_api_request_seconds"), "p99"),
        ],
        unit="s",
    )
    d.row("Adapters")
    d.panel(
        "Adapter version in service",
        [("max by (domain, version) (driftrec_adapter_active_info) == 1", "{{domain}} {{version}}")],
        kind="table",
        instant=True,
        w=8,
        description="The LoRA adapter version each domain is served with.",
    )
    d.panel(
        "Adapter swaps",
        [(f"sum by (domain, outcome) (increase(driftrec_adapter_swaps_total[{W_SLOW}]))", "{{domain}} {{outcome}}")],
        w=8,
    )
    d.panel(
        "Checkpoint rejections",
        [(f"sum by (reason) (increase(driftrec_checkpoint_rejections_total[{W_SLOW}]))", "{{reason}}")],
        w=8,
    )
    return d.build()


def model() -> dict[str, Any]:
    d = Dashboard(
        "model",
        "driftrec / Model",
        "Online correction error and drift, training, gating, rollbacks and online quality.",
    )
    d.row("Online quality")
    d.panel(
        "Online HR@10",
        [("max by (model) (driftrec_online_hr_at_10)", "{{model}}")],
        unit="percentunit",
        minimum=0,
        maximum=1,
    )
    d.panel(
        "Online NDCG@10",
        [("max by (model) (driftrec_online_ndcg_at_10)", "{{model}}")],
        unit="percentunit",
        minimum=0,
        maximum=1,
    )
    d.panel(
        "Ranking policy: interactions waiting to be learnt",
        [("max by (instance) (driftrec_ranking_backlog)", "{{instance}}")],
        description="The policy learns every interaction in turn (its fusion in the worker's learner process); "
        "a backlog that stays up means it does not keep up with the event rate (alert "
        "DriftrecRankingLearningBehind).",
        minimum=0,
    )
    d.panel(
        "Ranking policy: learner process exits",
        [("sum by (instance) (increase(driftrec_ranking_learner_exits_total[15m]))", "{{instance}}")],
        description="The worker's learner process went away; the worker learns in its own process since "
        "(alert DriftrecRankingLearnerExited).",
        minimum=0,
    )
    d.panel(
        "Ranking policy: interactions learnt / s",
        [("sum by (instance) (rate(driftrec_ranking_observed_total[1m]))", "{{instance}}")],
        unit="ops",
        minimum=0,
    )
    d.row("Online correction and drift")
    d.panel(
        "River correction error (windowed MAE)",
        [
            ("max by (domain) (driftrec_correction_error)", "{{domain}}"),
            (_q(0.9, "driftrec_correction_abs_error"), "p90 abs error (all)"),
        ],
        minimum=0,
    )
    d.panel(
        "Drift detections",
        [(f"sum by (domain, detector) (increase(driftrec_drift_detections_total[{W_SLOW}]))", "{{domain}} {{detector}}")],
        minimum=0,
    )
    d.row("Training and promotion")
    d.panel(
        "Gate decisions",
        [(f"sum by (decision) (increase(driftrec_gate_decisions_total[{W_SLOW}]))", "{{decision}}")],
        stack=True,
        w=8,
    )
    d.panel(
        "Rollbacks",
        [(f"sum by (domain) (increase(driftrec_rollbacks_total[{W_SLOW}]))", "{{domain}}")],
        thresholds=[(None, "green"), (1, "red")],
        w=8,
    )
    d.panel(
        "Trainer runs by outcome",
        [(f"sum by (outcome) (increase(driftrec_trainer_runs_total[{W_SLOW}]))", "{{outcome}}")],
        stack=True,
        w=8,
    )
    d.panel(
        "Trainer step time p50 / p99",
        [
            (_q(0.5, "driftrec_trainer_step_seconds"), "p50"),
            (_q(0.99, "driftrec_trainer_step_seconds"), "p99"),
        ],
        unit="s",
        w=24,
    )
    return d.build()


DASHBOARDS = {"pipeline": pipeline, "serving": serving, "model": model}  # file name -> builder


def render(dashboard: dict[str, Any]) -> str:
    """The exact text committed for a dashboard: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[Path, str]:
    """Output path -> file text, for every dashboard."""
    return {OUT_DIR / f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("out of date (run python dashboards/generate.py):", *map(str, stale), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
