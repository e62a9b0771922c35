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
    cfg.write_text("scorer:\n  port: 9999\n  admin_token: token-from-the-file\ntopics:\n  clicks: {name: my.clicks, partitions: 8}\n")
    monkeypatch.setenv("DRIFTREC_SCORER__ADMIN_TOKEN", "token-from-the-env")
    s = Settings.load(config=cfg)
    assert s.scorer.port == 9999
    assert s.scorer.admin_token.get_secret_value() == "token-from-the-env"  # env beats the file
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


def test_a_config_file_that_is_not_a_mapping_or_names_an_unknown_setting_is_an_error(tmp_path, monkeypatch):
    listed = tmp_path / "list.yaml"
    listed.write_text("- scorer\n- port\n")
    with pytest.raises(ValueError, match="mapping"):
        Settings.load(config=listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("scorer:\n  prot: 9999\n")
    monkeypatch.setenv("DRIFTREC_CONFIG", str(typo))  # the environment names the file too
    with pytest.raises(ValidationError, match="prot"):
        Settings.load()


def test_secrets_are_hidden_and_long_enough():
    s = Settings(scorer={"admin_token": "a-long-enough-token"}, security={"control_key": "k" * 32})
    assert "a-long-enough-token" not in repr(s) and "a-long-enough-token" not in s.model_dump_json()
    assert "k" * 32 not in repr(s.security)
    assert s.scorer.admin_token.get_secret_value() == "a-long-enough-token"
    assert s.security.control_key_bytes() == b"k" * 32
    with pytest.raises(ValueError, match="at least 16") as info:
        Settings(scorer={"admin_token": "short-secret"})
    assert "short-secret" not in str(info.value)  # the rejected value is not echoed
    with pytest.raises(ValueError, match="at least 32"):
        Settings(security={"control_key": "k" * 31})
    assert Settings(scorer={"admin_token": ""}).scorer.admin_token is None  # empty = admin disabled
    assert Settings().metrics.host == "127.0.0.1"  # metrics bind loopback unless configured


def test_settings_dump_for_a_child_process_round_trips_without_secrets(monkeypatch):
    import json

    s = Settings(scorer={"admin_token": "a-long-enough-token", "port": 9001}, security={"control_key": "k" * 40})
    text = s.dump_without_secrets()
    assert "**" not in text and "a-long-enough-token" not in text and "k" * 40 not in text
    monkeypatch.delenv("DRIFTREC_SECURITY__CONTROL_KEY", raising=False)
    child = Settings(**json.loads(text))  # what the writer process does
    assert child.scorer.port == 9001 and child.security.control_key is None
    monkeypatch.setenv("DRIFTREC_SECURITY__CONTROL_KEY", "e" * 40)
    assert Settings(**json.loads(text)).security.control_key_bytes() == b"e" * 40  # from its environment


def test_stream_web_port_is_gone():
    # The Faust web server is disabled (streams/app.py), so its port setting was removed; a config
    # still naming it is rejected like any unknown key rather than silently ignored.
    assert "web_port" not in Settings().stream.model_dump()
    with pytest.raises(ValidationError, match="web_port"):
        Settings(stream={"web_port": 6066})
