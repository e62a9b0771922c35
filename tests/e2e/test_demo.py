"""``driftrec demo`` - the README's first command - on embedded defaults (the ranking policy engine):
it waits for the worker's policy, answers every request without the fallback, shows the trainer's
knowledge models being hot-swapped into the worker (the served version changes mid-run), and ends with
its personalisation and online HR@10 lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_demo_on_embedded_defaults_serves_the_policy_and_reports_online_quality(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTREC_")}
    env.update(TMPDIR=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "driftrec.cli", "demo", "--events", "2000", "--quiet", "--rate", "100"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ranking policy" in out and "ranking ready" in out, out
    done = re.search(r"done: 2000 events, (\d+) requests, (\d+) recommendations \((\d+) fallback\)", out)
    assert done, out
    requests, answered, fallback = map(int, done.groups())
    assert requests == 100 and answered == requests and fallback == 0, out
    # the trainer promoted a knowledge model mid-run and the answers show the worker switching to it
    swap = re.search(r"hot-swap: the worker now serves model (\S+) \(was model (\S+)\)", out)
    assert swap and swap.group(1) != swap.group(2), out
    served = re.search(r"served in turn: model collaborative -> model (\S+)", out)
    assert served, out
    personal = re.search(r"personalisation: (\d+) different first items across the last lists of (\d+) users", out)
    assert personal and int(personal.group(1)) > 1, out  # not the same first item for everyone
    online = re.search(r"online HR@10 on the demo world \((\d+) requests .*\): served ([0-9.]+) vs popularity ([0-9.]+)",
                       out)
    assert online and int(online.group(1)) > 0, out
