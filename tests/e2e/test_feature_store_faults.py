"""Online-store faults end to end: a real broker, a real worker, its writer process, a real store.

* the writer process hangs (SIGSTOP) longer than ``feast.write_timeout_s``: the worker kills it and
  retries the write in a new one;
* the Redis server hangs (SIGSTOP) for 10 s, or is killed and restarted 10 s later (with its
  append-only file, as a production Redis runs): the writes time out or are refused, are retried with
  back-off, and land when it is back.

Each ends with the online features equal to a ground truth computed from the events
(tests/e2e/test_features_e2e.py): nothing lost, nothing counted twice, and the worker still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from driftrec.core.broker import free_port
from driftrec.feature_store.reader import FeatureReader
from driftrec.model.evaluation.world import World
from tests.e2e.test_features_e2e import (N_EVENTS, _catalogue, _events, _records, _settings, _start_worker,
                                         _wait_equal, diff_features, ground_truth)
from tests.support import produce_raw, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

OUTAGE_S = 10.0


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def writer_pid(worker_pid: int) -> int | None:
    """The worker's writer process: the child of its multiprocessing fork server."""
    procs = _procs()
    servers = {p for p, (pp, cmd) in procs.items() if pp == worker_pid and "forkserver" in cmd}
    writers = [p for p, (pp, _) in procs.items() if pp in servers]
    return writers[0] if len(writers) == 1 else None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class RedisServer:
    """A redis-server of the test's own on a free port."""

    def __init__(self, tmp_path, *, persistent: bool) -> None:
        self.port = free_port()
        self.dir = tmp_path / "redis"
        self.dir.mkdir(exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if persistent
                       else ["--appendonly", "no"])
        self.argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--dir", str(self.dir), *persistence]
        self.proc: subprocess.Popen | None = None
        self.url = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from driftrec.feature_store.backends.redis import ping

        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: ping(self.url), 30, message=f"redis-server on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case it was stopped
            self.proc.kill()
            self.proc.wait(10)


def _stream(tmp_path, kafka, seed, store="sqlite", **feast):
    bootstrap, _ = kafka
    settings = _settings(bootstrap, tmp_path, store)
    settings = settings.model_copy(update={"feast": settings.feast.model_copy(update=feast)})
    world = World(n_users=60, n_items=150, seed=seed)
    events = _events(world, N_EVENTS, seed=seed)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    produce_raw(bootstrap, _catalogue(settings, world))
    return bootstrap, settings, events, truth


def _rows_written(worker) -> float:
    return worker.metric("driftrec_feature_rows_written_total")


def _failures(worker, reason) -> float:
    return worker.metric("driftrec_feature_write_failures_total", {"reason": reason})


def test_a_hung_writer_process_is_replaced_and_its_write_retried(kafka, tmp_path):
    """Fault 2: the writer process stops (SIGSTOP) mid-stream and never resumes by itself: past
    feast.write_timeout_s the worker kills it, starts another, retries the write; features = truth."""
    bootstrap, settings, events, truth = _stream(tmp_path, kafka, 31, write_timeout_s=2.0)
    worker = _start_worker(settings)
    reader = FeatureReader(settings)
    stopped = None
    try:
        produce_raw(bootstrap, _records(settings, events[:2000]))
        wait_until(lambda: _rows_written(worker) > 0 and writer_pid(worker.proc.pid), 90,
                   message="the first rows to be written")
        stopped = writer_pid(worker.proc.pid)
        os.kill(stopped, signal.SIGSTOP)
        t_stop = time.monotonic()
        produce_raw(bootstrap, _records(settings, events[2000:]))
        wait_until(lambda: _failures(worker, "timeout") >= 1, 60, message="the write to time out")
        wait_until(lambda: _gone(stopped), 10, message="the hung writer process to be killed")
        assert time.monotonic() - t_stop >= 2.0
        _wait_equal(reader, truth, 120, "features after the hung writer to equal the ground truth", worker)
        new = writer_pid(worker.proc.pid)
        assert new is not None and new != stopped
        assert worker.proc.poll() is None
        assert not diff_features(reader, truth)
    finally:
        if stopped is not None and not _gone(stopped):
            os.kill(stopped, signal.SIGCONT)
        worker.stop()
        reader.close()


@pytest.mark.parametrize("fault", ["pause", "kill_restart"])
def test_redis_away_for_ten_seconds_mid_stream(kafka, tmp_path, fault):
    """Fault 1: the online store's Redis goes away for 10 s mid-stream.

    pause: SIGSTOP/SIGCONT (a hung server: connections accept, nothing answers - each write times out,
    its writer process is killed, and Redis later runs the commands the killed ones had sent; the
    event-time condition keeps them from overwriting newer rows). kill_restart: SIGKILL, and a new
    server on the same port 10 s later, from its append-only file (how a production Redis runs;
    writes are refused meanwhile). Either way the worker retries with back-off and ends at the truth."""
    redis = RedisServer(tmp_path, persistent=fault == "kill_restart")
    redis.start()
    worker = reader = None
    try:
        bootstrap, settings, events, truth = _stream(tmp_path, kafka, 32, store="redis", redis_url=redis.url,
                                                     write_timeout_s=3.0)
        worker = _start_worker(settings)
        reader = FeatureReader(settings)
        produce_raw(bootstrap, _records(settings, events[:2000]))
        wait_until(lambda: _rows_written(worker) > 0, 90, message="the first rows to be written")
        t_down = time.monotonic()
        if fault == "pause":
            os.kill(redis.proc.pid, signal.SIGSTOP)
        else:
            redis.kill()
        produce_raw(bootstrap, _records(settings, events[2000:]))
        reason = "timeout" if fault == "pause" else "store_error"
        wait_until(lambda: _failures(worker, reason) >= 1, 60, message=f"a failed write ({reason})")
        # the outage lasts 10 s (the fault's length, not a wait for the system)
        wait_until(lambda: time.monotonic() - t_down >= OUTAGE_S, OUTAGE_S + 5, message="the outage's end")
        assert worker.proc.poll() is None, "the worker gave up during a 10 s outage"
        if fault == "pause":
            os.kill(redis.proc.pid, signal.SIGCONT)
        else:
            redis.start()
        _wait_equal(reader, truth, 120, f"features after Redis was away ({fault}) to equal the ground truth", worker)
        assert worker.proc.poll() is None
        assert not diff_features(reader, truth)
    finally:
        if worker is not None:
            worker.stop()
        if reader is not None:
            reader.close()
        redis.kill()
