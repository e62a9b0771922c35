"""docker/: compose file, Dockerfiles, Prometheus config and alert rules (no Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from driftrec.testing.prometheus import promtool_binary

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROM_DIR = DOCKER / "prometheus"
ALERTMANAGER_CONFIG = DOCKER / "alertmanager" / "alertmanager.yml"
COMPOSE = DOCKER / "compose.yaml"
DRIFTREC_SERVICES = {"worker": "worker", "trainer": "train", "scorer": "scorer"}

_INTERPOLATION_RE = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*)|:?\?[^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose ${VAR}, ${VAR:-default}, ${VAR:?error}: defaults kept, required values made up."""

    def repl(m: re.Match[str]) -> str:
        return m.group(3) if m.group(2) else f"test-{m.group(1).lower()}-{'0' * 48}"  # long enough for a secret

    return _INTERPOLATION_RE.sub(repl, value)


def _torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    [pin] = [d for d in deps if d.replace(" ", "").startswith("torch==")]
    return pin.split("==", 1)[1].strip()


def test_compose_services(compose):
    services = compose["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "worker", "trainer", "scorer"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name, service in services.items():
        image = service.get("image", "")
        assert not image.endswith(":latest") or "build" in service, f"{name}: pin the image tag"
        assert ":" in image, f"{name}: pin the image tag"


def test_kafka_is_single_node_kraft(compose):
    env = _env(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "CONTROLLER:PLAINTEXT" in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1", key


def test_driftrec_services_configured_through_settings(compose, monkeypatch):
    from driftrec.core.settings import Settings

    services = compose["services"]
    for name, subcommand in DRIFTREC_SERVICES.items():
        service = services[name]
        assert service["command"] == ["driftrec", subcommand], name
        env = _env(service)
        assert env, name
        for key in env:
            assert key.startswith("DRIFTREC_"), f"{name}: {key} is not a driftrec setting"
            section = key[len("DRIFTREC_"):].split("__", 1)[0].lower()
            assert section in Settings.model_fields, f"{name}: {key} names no settings section"
        assert env["DRIFTREC_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["DRIFTREC_FEAST__ONLINE_STORE"] == "redis"
        assert env["DRIFTREC_FEAST__REDIS_URL"] == "redis:6379"
        assert "DRIFTREC_SCORER__ADMIN_TOKEN" in env
        assert "DRIFTREC_METRICS__PORT" in env
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("DRIFTREC_")]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, _interpolate(value))
            settings = Settings()  # validates every value (extra keys in a section are rejected)
        assert settings.kafka.bootstrap_servers == "kafka:9092" and not settings.kafka.embedded
        assert settings.feast.online_store == "redis"
        assert settings.scorer.admin_token, f"{name}: the admin token must be set"
        assert settings.scorer.base_url == "http://scorer:8088"


def test_admin_token_is_not_hardcoded(compose):
    for name in DRIFTREC_SERVICES:
        env = _env(compose["services"][name])
        for secret in ("DRIFTREC_SCORER__ADMIN_TOKEN", "DRIFTREC_SECURITY__CONTROL_KEY"):
            value = env[secret]
            assert value.startswith("${") and ":?" in value, f"{name}: {secret} must come from the environment"


def test_nothing_unauthenticated_is_published(compose):
    """Kafka (plaintext) is not published; what is, binds the host's loopback; no default passwords,
    no Prometheus lifecycle API; the scorer's health is its readiness."""
    services = compose["services"]
    assert "ports" not in services["kafka"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert not any("lifecycle" in arg for arg in services["prometheus"]["command"])
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${") and ":?" in password, "Grafana must not fall back to a default password"
    assert "/readyz" in " ".join(services["scorer"]["healthcheck"]["test"])
    for name in DRIFTREC_SERVICES:
        assert _env(services[name])["DRIFTREC_METRICS__HOST"] == "0.0.0.0"  # scraped over the compose network


def test_scorer_reserves_an_nvidia_gpu(compose):
    scorer = compose["services"]["scorer"]
    devices = scorer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert scorer["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    env = _env(scorer)
    assert env["DRIFTREC_SCORER__HOST"] == "0.0.0.0"


def test_the_default_engine_trains_on_the_gpu_and_the_scorer_is_the_loop_profile(compose):
    """The workers rank with the ranking policy (the default engine); the trainer, which publishes its
    knowledge model, gets the GPU; the LM scorer starts only with `--profile loop` and nothing else
    waits for it."""
    from driftrec.core.settings import Settings

    services = compose["services"]
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert _env(trainer)["DRIFTREC_MODEL__DEVICE"] == "cuda"
    assert services["scorer"]["profiles"] == ["loop"]
    for name, service in services.items():
        assert "scorer" not in (service.get("depends_on") or {}), f"{name} must not wait for the optional scorer"
    for name in ("worker", "trainer"):
        env = _env(services[name])
        assert _interpolate(env["DRIFTREC_RANKING__ENGINE"]) == "policy" == Settings().ranking.engine
        assert env["DRIFTREC_MODEL__ADAPTER_DIR"].startswith("/data/shared")  # checkpoints shared with workers
        assert any(v.startswith("driftrec-shared:/data/shared") for v in services[name]["volumes"])


def test_build_contexts_dockerfiles_and_mounts_exist(compose):
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"{name}: mounted {source} is missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"


def test_prometheus_and_grafana_mounts(compose):
    def mounts(service: str) -> dict[str, Path]:
        out = {}
        for volume in compose["services"][service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                out[target] = (DOCKER / source).resolve()
        return out

    prom = mounts("prometheus")
    assert prom["/etc/prometheus/prometheus.yml"] == PROM_DIR / "prometheus.yml"
    assert prom["/etc/prometheus/alerts.yml"] == PROM_DIR / "alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]

    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == REPO / "dashboards" / "provisioning"
    provider = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/driftrec.yaml").read_text())["providers"][0]
    assert grafana[provider["options"]["path"]] == REPO / "dashboards" / "grafana"


def test_prometheus_scrapes_the_driftrec_services(compose):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"worker", "trainer", "scorer"} <= set(jobs)
    services = compose["services"]

    def targets(job: dict) -> list[str]:
        out = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        out += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        return out

    for job_name, port_key in (("worker", "DRIFTREC_METRICS__PORT"), ("trainer", "DRIFTREC_METRICS__PORT"),
                               ("scorer", "DRIFTREC_SCORER__PORT")):
        [target] = targets(jobs[job_name])
        host, port = target.rsplit(":", 1)
        assert host == job_name and host in services
        assert port == _env(services[job_name])[port_key], f"{job_name}: scrape port != {port_key}"


def test_alert_rules_cover_the_brief():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    freshness = alerts["DriftrecFeatureFreshnessSLOBreach"]
    assert "driftrec_feature_freshness_seconds_bucket" in freshness["expr"] and "0.25" in freshness["expr"]
    assert freshness["for"] == "5m"
    assert "driftrec_consumer_lag_messages" in alerts["DriftrecConsumerLagGrowing"]["expr"]
    assert "driftrec_recommendation_fallbacks_total" in alerts["DriftrecFallbackRateHigh"]["expr"]
    assert alerts["DriftrecScorerDown"]["expr"].replace(" ", "") == 'up{job="scorer"}==0'
    assert "driftrec_rollbacks_total" in alerts["DriftrecAdapterRollback"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"], name


def test_dockerfiles():
    pin = _torch_pin()
    cpu = (DOCKER / "Dockerfile").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    [cpu_from] = re.findall(r"^FROM\s+(\S+)", cpu, re.M)
    assert cpu_from.startswith("python:3.11-slim")
    assert f"ARG TORCH_VERSION={pin}" in cpu and "download.pytorch.org/whl/cpu" in cpu
    assert f"ARG TORCH_VERSION={pin}" in gpu
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", gpu, re.M).group(1)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "runtime" in base
    assert "python3.11" in gpu
    for text in (cpu, gpu):
        for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
            sources = [s for s in line.split()[:-1] if not s.startswith("--")]
            for s in sources:
                if not s.endswith("*"):
                    assert (REPO / s.rstrip("/")).exists(), f"COPY {s}: missing in the build context"
        assert "USER driftrec" in text
        assert 'pip install ".[worker,scorer]"' in text  # the base install is only the app client
    for ignore in ("Dockerfile.dockerignore", "Dockerfile.gpu.dockerignore"):
        assert (DOCKER / ignore).is_file()


# --------------------------------------------------------------------------------- promtool

needs_promtool = pytest.mark.skipif(
    promtool_binary() is None, reason="promtool not installed (apt-get install prometheus); .ci/run installs it"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool_binary(), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_config():
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules():
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_alert_unit_tests():
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- Alertmanager


def _compose_unescape(text: str) -> str:
    return text.replace("$$", "$")


def test_alertmanager_service(compose):
    services = compose["services"]
    am = services["alertmanager"]
    assert am["image"].startswith("prom/alertmanager:v")
    assert am["ports"] == ["127.0.0.1:9093:9093"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in am["volumes"]}
    assert (DOCKER / mounts["/etc/alertmanager/alertmanager.yml"]).resolve() == ALERTMANAGER_CONFIG
    assert "--config.file=/alertmanager/alertmanager.yml" in am["command"]
    assert "alertmanager" in (services["prometheus"].get("depends_on") or [])
    # the webhook URL comes from the environment, with the config file's placeholder as the default
    url = am["environment"]["ALERTMANAGER_WEBHOOK_URL"]
    assert url.startswith("${ALERTMANAGER_WEBHOOK_URL:-")
    placeholder = _interpolate(url)
    [receiver_url] = _webhook_urls(yaml.safe_load(ALERTMANAGER_CONFIG.read_text()))
    assert placeholder == receiver_url and ".invalid" in placeholder
    assert placeholder in am["entrypoint"][-2], "the start script must replace the file's placeholder"


def _webhook_urls(config: dict) -> list[str]:
    return [w["url"] for r in config["receivers"] for w in r.get("webhook_configs", [])]


def test_alertmanager_config_has_a_default_receiver():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    default = config["route"]["receiver"]
    assert default in receivers and receivers[default]["webhook_configs"]
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        assert route.get("receiver", default) in receivers
        routes.extend(route.get("routes", []))
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    for rule in config.get("inhibit_rules", []):
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            if matcher.startswith("alertname="):
                assert matcher.split("=", 1)[1].strip('"') in alerts, f"inhibit rule names no alert: {matcher}"


def test_prometheus_sends_alerts_to_alertmanager(compose):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]
    host, port = targets[0].split(":")
    service = compose["services"][host]
    assert any(p.endswith(f":{port}") for p in service["ports"]), "Alertmanager listens on 9093 in the container"


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("sed") is None, reason="needs sh and sed")
@pytest.mark.parametrize("url", ["https://hooks.example.com/alerts?a=1&b=2", "http://10.0.0.5:9000/x|y\\z", None])
def test_alertmanager_start_script_puts_the_webhook_url_in(compose, tmp_path, url):
    """Run the compose start script (paths redirected, Alertmanager itself replaced by `true`)."""
    am = compose["services"]["alertmanager"]
    assert am["entrypoint"][:2] == ["/bin/sh", "-c"]
    script = _compose_unescape(am["entrypoint"][2])
    assert script.count("/etc/alertmanager/alertmanager.yml") == 1
    script = script.replace("/etc/alertmanager/alertmanager.yml", "@SOURCE@")
    assert script.count("/alertmanager/alertmanager.yml") == 1
    script = script.replace("/alertmanager/alertmanager.yml", str(tmp_path / "out.yml"))
    script = script.replace("@SOURCE@", str(ALERTMANAGER_CONFIG))
    assert "exec /bin/alertmanager" in script
    script = script.replace("exec /bin/alertmanager", "exec true")
    default = _interpolate(am["environment"]["ALERTMANAGER_WEBHOOK_URL"])
    env = {"PATH": os.environ["PATH"], "ALERTMANAGER_WEBHOOK_URL": default if url is None else url}
    result = subprocess.run(["sh", "-c", script, "alertmanager", *am["command"]], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load((tmp_path / "out.yml").read_text())
    assert _webhook_urls(rendered) == [default if url is None else url]
    original = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    rendered["receivers"][0]["webhook_configs"][0]["url"] = _webhook_urls(original)[0]
    assert rendered == original, "only the URL may change"


@needs_promtool
def test_promtool_check_config_with_alerting():
    # promtool checks the alerting section too; a broken target list fails it
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config.get("alerting")
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("amtool") is None,
                    reason="amtool not installed (apt-get install prometheus-alertmanager provides it)")
def test_amtool_check_config():
    result = subprocess.run(["amtool", "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_validates_the_compose_file():
    """``docker compose config`` (Compose's own schema and interpolation check), where Compose is installed."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed on this machine (the compose checks above parse it with PyYAML)")
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-" + "0" * 32, "DRIFTREC_CONTROL_KEY": "test-" + "0" * 64,
           "DRIFTREC_SCORER_ADMIN_TOKEN": "test-" + "0" * 32}
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                          env=env, cwd=DOCKER)
    assert done.returncode == 0, done.stderr
