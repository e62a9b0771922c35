"""The trigger -> new model serving benchmark of the default engine (``driftrec.bench.adapter_update.run_policy``)
on a small world: every repeat trains, gates, publishes and ends with a ranking policy serving the version it
published, the first (from-scratch) model is kept apart from the updates, and the update warm-starts (fewer
epochs than the first fit)."""

from __future__ import annotations

from driftrec.bench import adapter_update
from driftrec.core.settings import Settings


def test_policy_update_serves_each_published_version(monkeypatch, tmp_path):
    monkeypatch.setattr(adapter_update, "POLICY_USERS", 60)
    monkeypatch.setattr(adapter_update, "POLICY_ITEMS", 40)
    s = Settings()
    s.model.adapter_dir = tmp_path / "unused"  # the bench uses its own temporary folder
    s.trainer.window_events, s.trainer.context_events = 400, 400
    rows = adapter_update.run_policy(s, repeats=2)
    assert [r["version"] for r in rows] == ["k0002", "k0003"]  # k0001 is the first model, not an update
    for r in rows:
        assert r["outcome"] == "promoted" and r["served"] == r["version"]
        assert r["adapter_update_s"] >= r["train_s"] + r["gate_s"] > 0
        assert r["epochs"] < 30  # warm-started: SeqRecConfig.epochs, not init_epochs
    assert rows[0]["first_model_s"] > 0 and "first_model_s" not in rows[1]
    assert not (tmp_path / "unused").exists()
