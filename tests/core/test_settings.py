import pytest
from pydantic import ValidationError

from driftrec.core.settings import Settings


def test_defaults_are_embedded_and_valid():
    s = Settings()
    assert s.kafka.embedded
    assert s.topics.items.compacted
    assert len({t.name for t in s.topics.all()}) == len(s.topics.all())


def test_env_overrides_nested(monkeypatch):
    monkeypatch.setenv("DRIFTREC_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092, kafka-2:9093")
    monkeypatch.setenv("DRIFTREC_FEAST__ONLINE_STORE", "redis")
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9093"
    assert not s.kafka.embedded
    assert s.feast.online_store == "redis"


def test_yaml_file_and_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "driftrec.yaml"
    cfg.write_text("scorer:\n  port: 9999\n  admin_token: from-file\ntopics:\n  clicks: {name: my.clicks, partitions: 8}\n")
    monkeypatch.setenv("DRIFTREC_SCORER__ADMIN_TOKEN", "from-env")
    s = Settings.load(config=cfg)
    assert s.scorer.port == 9999
    assert s.scorer.admin_token == "from-env"  # env beats the file
    assert s.topics.clicks.name == "my.clicks" and s.topics.clicks.partitions == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kafka": {"bootstrap_servers": "no-port"}}, "host:port"),
        ({"kafka": {"bootstrap_servers": "h:99999"}}, "host:port"),
        ({"topics": {"clicks": {"name": "bad topic!"}}}, "invalid Kafka topic name"),
        ({"topics": {"clicks": {"name": "same"}, "ratings": {"name": "same"}}}, "distinct"),
        ({"topics": {"clicks": {"name": "c", "partitions": 0}}}, "greater than or equal to 1"),
        ({"feast": {"online_store": "cassandra"}}, "sqlite"),
        ({"kafka": {"heartbeat_interval_s": 40, "session_timeout_s": 30}}, "below"),
        ({"nonsense": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ValidationError) as err:
        Settings(**overrides)
    assert message in str(err.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Settings.load(config=tmp_path / "nope.yaml")
