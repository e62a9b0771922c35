"""driftrec/cli.py: where --config may stand, and that the settings come from that file (in-process)."""

from __future__ import annotations

import os

import pytest

from driftrec import cli


@pytest.fixture
def captured(monkeypatch):
    """Replace the commands' work with a recorder of the settings they were handed."""
    import driftrec.worker

    for key in [k for k in os.environ if k.startswith("DRIFTREC_")]:
        monkeypatch.delenv(key)
    seen: list = []

    def fake_worker(settings):
        seen.append(settings)
        return 0

    monkeypatch.setattr(driftrec.worker, "run_worker", fake_worker)
    return seen


def _config(tmp_path, name: str, app_id: str, port: int):
    path = tmp_path / name
    path.write_text(f"stream:\n  app_id: {app_id}\nscorer:\n  port: {port}\n")
    return path


@pytest.mark.parametrize("where", ["before", "after", "after-equals"])
def test_config_before_or_after_the_subcommand(tmp_path, captured, where):
    cfg = _config(tmp_path, "f.yaml", "from-the-file", 9911)
    argv = {"before": ["--config", str(cfg), "worker"], "after": ["worker", "--config", str(cfg)],
            "after-equals": ["worker", f"--config={cfg}"]}[where]
    assert cli.main(argv) == 0
    [settings] = captured
    assert settings.stream.app_id == "from-the-file"
    assert settings.scorer.port == 9911


def test_config_after_the_subcommand_wins(tmp_path, captured):
    first = _config(tmp_path, "first.yaml", "first", 9001)
    second = _config(tmp_path, "second.yaml", "second", 9002)
    assert cli.main(["--config", str(first), "worker", "--config", str(second)]) == 0
    assert [s.stream.app_id for s in captured] == ["second"]


def test_no_config_means_defaults(captured):
    from driftrec.core.settings import Settings

    assert cli.main(["worker"]) == 0
    assert captured[0].stream.app_id == Settings().stream.app_id


def test_verbose_after_the_subcommand(tmp_path, captured):
    args = cli.build_parser().parse_args(["worker", "-v"])
    assert args.verbose is True and args.config is None
    args = cli.build_parser().parse_args(["-v", "worker"])
    assert args.verbose is True
    args = cli.build_parser().parse_args(["worker"])
    assert args.verbose is False


def test_every_plain_subcommand_takes_config_after_it(tmp_path):
    cfg = str(tmp_path / "x.yaml")
    parser = cli.build_parser()
    extra = {"produce": [], "subscribe": [], "scorer": [], "demo": [], "broker": [], "worker": []}
    for name, more in extra.items():
        args, rest = parser.parse_known_args([name, *more, "--config", cfg])
        assert args.config == cfg and not rest, name


def test_bad_config_after_the_subcommand_is_reported(tmp_path, captured, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stream:\n  no_such_setting: 1\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["worker", "--config", str(cfg)])
    assert exc.value.code == 2
    assert "invalid configuration" in capsys.readouterr().err
    assert not captured


def test_passthrough_commands_get_the_leading_config(tmp_path, monkeypatch):
    import driftrec.bench.run
    import driftrec.model.training.worker

    got: dict[str, list[str]] = {}
    monkeypatch.setattr(driftrec.bench.run, "main", lambda argv: got.setdefault("bench", argv) and 0)
    monkeypatch.setattr(driftrec.model.training.worker, "train_main", lambda argv: got.setdefault("train", argv) and 0)
    cli.main(["--config", "a.yaml", "bench", "--only", "x"])
    cli.main(["--config", "a.yaml", "train", "--config", "b.yaml"])
    assert got["bench"] == ["--only", "x", "--config", "a.yaml"]
    assert got["train"] == ["--config", "b.yaml"]  # its own --config wins, not appended twice


def test_through_stream_takes_a_graph_only_as_the_worker_loads_it(tmp_path, capsys):
    """--through-stream hands --kg to the worker as ranking.kg_path (one path); a separate link file or
    format the worker has no setting for is refused up front, with the reason, before any data is read."""
    from driftrec.through_stream import through_stream_main

    rc = through_stream_main(["--data", str(tmp_path / "none"), "--format", "ml-100k", "--kg", str(tmp_path),
                              "--kg-link", str(tmp_path / "links.tsv")])
    assert rc == 2
    assert "ranking.kg_path" in capsys.readouterr().err
