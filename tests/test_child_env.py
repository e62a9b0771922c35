"""The environment the demo and the benchmarks give their child processes: their checkpoints stay in the
run's folder unless an adapter folder is configured (a run must not serve, or leave behind, a model in the
default ``.driftrec/adapters``)."""

from __future__ import annotations

from pathlib import Path

from driftrec.core.settings import Settings
from driftrec.demo import child_env


def test_a_runs_children_keep_checkpoints_in_the_run_folder_unless_one_is_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("DRIFTREC_MODEL__ADAPTER_DIR", raising=False)
    run = tmp_path / "run"
    env = child_env(Settings(), "127.0.0.1:9092", run)
    assert env["DRIFTREC_MODEL__ADAPTER_DIR"] == str(run / "adapters")
    assert env["DRIFTREC_FEAST__REPO_DIR"] == str(run / "feast")

    mine = tmp_path / "my-adapters"
    env = child_env(Settings(model={"adapter_dir": str(mine)}), "127.0.0.1:9092", run)
    assert env["DRIFTREC_MODEL__ADAPTER_DIR"] == str(mine)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DRIFTREC_MODEL__ADAPTER_DIR", ".driftrec/adapters")  # the default, but chosen
    env = child_env(Settings.load(), "127.0.0.1:9092", run)
    assert Path(env["DRIFTREC_MODEL__ADAPTER_DIR"]) == tmp_path / ".driftrec" / "adapters"
