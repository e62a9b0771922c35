"""Run a real Prometheus against driftrec processes in tests, and list driftrec's PromQL.

    from driftrec.testing.prometheus import start_prometheus, query, wait_for_query

    with start_prometheus(["127.0.0.1:9108"]) as prom:       # scrapes every 1 s
        result = wait_for_query(prom, "driftrec_events_ingested_total")
        # [{"metric": {"__name__": ..., "job": "driftrec", ...}, "value": [ts, "3"]}, ...]

Needs the ``prometheus`` binary (Debian/Ubuntu: ``apt-get install prometheus``); tests should
``pytest.skip`` when ``prometheus_binary()`` is None. ``all_promql_expressions()`` yields every
PromQL expression of the Grafana dashboards and the alert rules.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "dashboards" / "grafana"
ALERT_RULES = REPO_ROOT / "docker" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server binary (``$PROMETHEUS_BIN`` or on PATH), or None."""
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def promtool_binary() -> str | None:
    """Path of ``promtool`` (``$PROMTOOL_BIN`` or on PATH), or None."""
    return os.environ.get("PROMTOOL_BIN") or shutil.which("promtool")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class PrometheusServer:
    """A running Prometheus; stop it with ``stop()`` or use it as a context manager."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape_config(
    targets: Iterable[str] | Mapping[str, Iterable[str]],
    *,
    interval_s: float = 1.0,
    rule_files: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Prometheus config scraping ``host:port`` targets (a list: job ``driftrec``; a mapping: job -> targets)."""
    jobs = dict(targets) if isinstance(targets, Mapping) else {"driftrec": targets}
    interval = f"{int(interval_s * 1000)}ms"
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(job_targets)}]}
            for job, job_targets in jobs.items()
        ],
    }


def start_prometheus(
    targets: Iterable[str] | Mapping[str, Iterable[str]],
    *,
    interval_s: float = 1.0,
    rule_files: Iterable[str | Path] = (),
    ready_timeout_s: float = 30.0,
    binary: str | None = None,
) -> PrometheusServer:
    """Start ``prometheus`` on a free local port scraping ``targets`` every ``interval_s``; wait until ready.

    ``targets``: ``["host:port", ...]`` (job ``driftrec``) or ``{"job": ["host:port", ...]}``.
    ``rule_files``: rule files to load (e.g. ``ALERT_RULES``) so alerts can be queried via ``ALERTS``.
    Raises RuntimeError (with Prometheus' log) when it exits or is not ready in time.
    """
    binary = binary or prometheus_binary()
    if not binary:
        raise RuntimeError("prometheus binary not found (apt-get install prometheus, or set PROMETHEUS_BIN)")
    config = scrape_config(targets, interval_s=interval_s, rule_files=rule_files)
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probing and binding: retry
        tmp = tempfile.TemporaryDirectory(prefix="driftrec-prom-")
        workdir = Path(tmp.name)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        server = PrometheusServer(process=process, port=port, workdir=workdir, log_path=log_path, _tmp=tmp)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        last_error = server.log()
        exited = process.poll() is not None
        server.stop()
        if not exited or "address already in use" not in last_error:
            break
    raise RuntimeError(f"prometheus did not become ready:\n{last_error[-4000:]}")


def query(prom: PrometheusServer | str, expr: str, *, at: float | None = None, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Instant query (``/api/v1/query``); returns ``data.result`` (for a vector: a list of
    ``{"metric": {...}, "value": [ts, "v"]}``). Raises RuntimeError when Prometheus reports an error
    (a PromQL syntax error included)."""
    base = prom.url if isinstance(prom, PrometheusServer) else prom.rstrip("/")
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    request = urllib.request.Request(
        f"{base}/api/v1/query",
        data=urllib.parse.urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise RuntimeError(f"query {expr!r} failed: HTTP {exc.code}") from exc
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def wait_for_query(
    prom: PrometheusServer | str,
    expr: str,
    *,
    timeout_s: float = 30.0,
    predicate: Callable[[list[dict[str, Any]]], bool] = bool,
    poll_s: float = 0.5,
) -> list[dict[str, Any]]:
    """Repeat ``query`` until ``predicate(result)`` holds (default: non-empty); return that result."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while True:
        result = query(prom, expr)
        if predicate(result):
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{expr!r} did not satisfy the predicate within {timeout_s}s; last result {result!r}")
        time.sleep(poll_s)


def sample_values(result: list[dict[str, Any]]) -> list[float]:
    """The float values of an instant-vector result."""
    return [float(item["value"][1]) for item in result]


def _walk_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in sorted(node.items()):
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_exprs(item)


def promql_expressions_by_source(
    dashboard_dir: Path = DASHBOARD_DIR, alert_rules: Path = ALERT_RULES
) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` for every PromQL expression in the dashboards and the alert rules."""
    for path in sorted(dashboard_dir.glob("*.json")):
        for expr in _walk_exprs(json.loads(path.read_text())):
            yield f"{path.relative_to(REPO_ROOT)}", expr
    rules = yaml.safe_load(alert_rules.read_text()) or {}
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            yield f"{alert_rules.relative_to(REPO_ROOT)}:{name}", rule["expr"]


def all_promql_expressions() -> Iterator[str]:
    """Every PromQL expression used in the Grafana dashboards and the Prometheus alert rules."""
    for _where, expr in promql_expressions_by_source():
        yield expr


# ----------------------------------------------------------------------------- PromQL parsing

PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
     "offset", "atan2", "inf", "nan", "start", "end"}
)
PROMQL_FUNCTIONS = frozenset(
    {
        # aggregation operators
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
        "topk", "quantile", "limitk", "limit_ratio",
        # functions
        "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
        "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
        "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
        "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "double_exponential_smoothing",
        "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
        "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
        "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time", "timestamp", "vector",
        "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
        "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
        "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
        "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
    }
)

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS_RE = re.compile(r"\{[^}]*\}")
_RANGE_RE = re.compile(r"\[[^\]]*\]")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT_RE = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")


def parse_promql_names(expr: str) -> tuple[set[str], set[str]]:
    """``(metric names, function/aggregation names)`` used in a PromQL expression.

    A lexical approximation, good for driftrec's own expressions: strings, label matchers, range
    selectors and grouping label lists are dropped; an identifier followed by ``(`` is a function,
    any other non-keyword identifier is a metric name.
    """
    s = _STRING_RE.sub('""', expr)
    s = _MATCHERS_RE.sub(" ", s)
    s = _RANGE_RE.sub(" ", s)
    s = _GROUPING_RE.sub(" ", s)
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in _IDENT_RE.finditer(s):
        name, call = match.group(1), match.group(2)
        if name.lower() in PROMQL_KEYWORDS:
            continue
        (functions if call else metrics).add(name)
    return metrics, functions
