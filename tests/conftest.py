from __future__ import annotations

import asyncio
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from driftrec.core.broker import create_topics  # noqa: E402
from tests.support import settings_for, start_broker, tansu_pids  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_broker_outlives_the_run():
    """Every embedded broker a test starts is stopped by the end of the run."""
    before = tansu_pids()
    yield
    time.sleep(0.5)
    # New brokers that are ours (descendants of this run) or orphans; other runs on the machine are not.
    leftover = {p for p in tansu_pids() - before if _ours_or_orphan(p)}
    assert not leftover, f"Tansu broker process(es) {sorted(leftover)} outlived the test run"


def _ours_or_orphan(pid: int) -> bool:
    me = os.getpid()
    first = True
    try:
        while pid > 1:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid == me or (first and ppid == 1):
                return True
            first = False
            pid = ppid
    except (OSError, ValueError):
        return False
    return False


@pytest.fixture
def kafka(tmp_path):
    """A fresh embedded Tansu broker with driftrec's topics; yields (bootstrap, settings)."""
    emb = start_broker()
    try:
        settings = settings_for(emb.bootstrap_servers, tmp_path)
        asyncio.run(create_topics(emb.bootstrap_servers, settings))
        yield emb.bootstrap_servers, settings
    finally:
        emb.stop()
