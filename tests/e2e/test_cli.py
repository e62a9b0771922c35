"""`driftrec produce` and `driftrec subscribe` round trip, as an app team would use them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from driftrec.model.evaluation.world import World
from tests.support import ROOT, Proc, env_for

pytestmark = pytest.mark.slow


def run_cli(args, settings, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "driftrec.cli", *args], cwd=ROOT, env=env_for(settings),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def test_produce_and_subscribe_round_trip(kafka, tmp_path):
    bootstrap, settings = kafka
    world = World(n_users=10, n_items=20, seed=9)
    lines = [json.dumps({**it.to_wire(), "event_time": time.time()}) for it in world.items]
    for ev in world.events(100):
        lines.append(json.dumps({**ev.to_wire(), "event_time": time.time()}))
    requests = [{"type": "recommendation_request", "event_id": f"cli-{i}", "user_id": world.user_id(i), "k": 4}
                for i in range(5)]
    lines += [json.dumps(r) for r in requests]  # event_time filled in by the producer
    lines.insert(30, '{"type": "click", "user_id": "u1"}')  # missing fields: reported, not sent
    lines.insert(31, "not json at all")
    events_file = tmp_path / "events.jsonl"
    events_file.write_text("\n".join(lines) + "\n")

    worker = Proc(["worker"], env_for(settings), name="worker")
    try:
        worker.metrics_port
        produced = run_cli(["produce", str(events_file), "--echo"], settings)
        assert produced.returncode == 1, produced.stderr  # two bad lines
        assert "line 31: missing_field" in produced.stderr
        assert "line 32: not JSON" in produced.stderr or "line 32:" in produced.stderr
        assert f"sent {len(lines) - 2} events, 2 rejected" in produced.stderr
        echoed = produced.stdout.split()
        assert len(echoed) == len(lines) - 2 and "cli-0" in echoed

        sub = run_cli(["subscribe", "--from-beginning", "--max", "5", "--timeout", "90"], settings, timeout=150)
        assert sub.returncode == 0, sub.stderr
        recs = [json.loads(line) for line in sub.stdout.splitlines()]
        assert sorted(r["request_id"] for r in recs) == [f"cli-{i}" for i in range(5)]
        for r in recs:
            assert 0 < len(r["items"]) <= 4
            assert all(set(i) == {"item_id", "score", "reason"} for i in r["items"])

        # stdin works too, and a user filter selects one user's answers
        one = json.dumps({"type": "recommendation_request", "event_id": "cli-stdin", "user_id": "solo", "k": 2})
        assert run_cli(["produce", "-"], settings, stdin=one + "\n").returncode == 0
        sub = run_cli(["subscribe", "--from-beginning", "--user", "solo", "--max", "1", "--timeout", "60"], settings)
        assert [json.loads(x)["request_id"] for x in sub.stdout.splitlines()] == ["cli-stdin"]
    finally:
        worker.stop()


def test_produce_without_a_broker_says_what_to_do(tmp_path, monkeypatch):
    from driftrec.core.settings import Settings

    env = {k: v for k, v in env_for(Settings()).items() if not k.startswith("DRIFTREC_KAFKA__BOOTSTRAP")}
    env["TMPDIR"] = str(tmp_path)  # no shared embedded-broker state file here
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "driftrec.cli", "produce", "-"], cwd=ROOT, env=env,
                          input='{"type":"click"}\n', capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "driftrec broker" in proc.stderr
