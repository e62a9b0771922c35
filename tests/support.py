"""Shared helpers for tests that run real processes: broker, Faust workers, consumers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from driftrec.core.broker import EmbeddedBroker
from driftrec.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def settings_for(bootstrap: str, tmp: Path, **overrides: Any) -> Settings:
    """Settings for a test run: the given broker (as Tansu), per-test data and feature dirs."""
    base = {
        "kafka": {"bootstrap_servers": bootstrap, "broker_kind": "tansu"},
        "stream": {"data_dir": str(tmp / "streams")},
        "feast": {"repo_dir": str(tmp / "feast")},
        "model": {"adapter_dir": str(tmp / "adapters")},
        "metrics": {"port": 0},
        "api": {"port": 0},
        # the stream tests drive the LM-scorer loop (faults of the HTTP scorer, adapter hot-swaps); the
        # policy engine (the default) has its own: test_parity, test_policy_ranker, test_trainer_kafka
        "ranking": {"engine": "loop"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return Settings(**base)


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that makes a child driftrec process use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTREC_") or k == "DRIFTREC_AGENTS"}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        if hasattr(section, "model_dump"):
            for key, value in section.model_dump(mode="json").items():
                if isinstance(value, (dict, list)) or value is None:
                    continue
                env[f"DRIFTREC_{section_name.upper()}__{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A driftrec child process whose output is collected; its metrics port is parsed from it."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str = "proc") -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "driftrec.cli", *argv], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no line matching {pattern!r} in {timeout}s:\n{self.output()[-4000:]}")

    @property
    def metrics_port(self) -> int:
        return int(self.wait_for_line(r"metrics on 127\.0\.0\.1:(\d+)").group(1))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        return metric_value(scrape(self.metrics_port), name, labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+([-+0-9.eEinfNa]+)$')


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if labels and any(got.get(k) != v for k, v in labels.items()):
            continue
        total += float(m.group(3))
    return total


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - e.g. metrics endpoint not up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}" + (f" (last error {last_exc!r})" if last_exc else ""))


async def read_topic(bootstrap: str, topic: str, *, min_count: int = 0, timeout: float = 30.0,
                     idle: float = 2.0) -> list[Any]:
    """All records of a topic from the beginning: waits for ``min_count``, then until ``idle`` s of quiet."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            n = sum(len(v) for v in batch.values())
            for records in batch.values():
                out.extend(records)
            if n:
                quiet_since = time.monotonic()
            elif len(out) >= min_count and time.monotonic() - quiet_since >= idle:
                break
        return out
    finally:
        await consumer.stop()


def read_topic_sync(bootstrap: str, topic: str, **kw: Any) -> list[Any]:
    return asyncio.run(read_topic(bootstrap, topic, **kw))


def read_json_topic(bootstrap: str, topic: str, **kw: Any) -> list[dict]:
    return [json.loads(r.value) for r in read_topic_sync(bootstrap, topic, **kw)]


def produce_raw(bootstrap: str, records: Iterable[tuple[str, bytes | None, bytes]]) -> int:
    """Send (topic, key, value) records and wait for every acknowledgement."""

    async def main() -> int:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5)
        await producer.start()
        try:
            futs = [await producer.send(t, value=v, key=k) for t, k, v in records]
            await asyncio.gather(*futs)
            return len(futs)
        finally:
            await producer.stop()

    return asyncio.run(main())


def committed_offsets(bootstrap: str, group: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The consumer group's committed offset per partition of ``topics`` (missing: nothing committed)."""

    async def go() -> dict[tuple[str, int], int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            out = {}
            for topic in topics:
                for p in sorted(consumer.partitions_for_topic(topic) or ()):
                    offset = await consumer.committed(TopicPartition(topic, p))
                    if offset is not None and offset >= 0:
                        out[(topic, p)] = offset
            return out
        finally:
            await consumer.stop()

    return asyncio.run(go())


def start_broker() -> EmbeddedBroker:
    return EmbeddedBroker().start(30.0)


def tansu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "tansu broker"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


class TcpProxy:
    """A loopback TCP forwarder that can be cut (connections dropped, new ones refused) and restored;
    with ``ssl_context`` it terminates TLS (clients speak TLS to it, it speaks plain TCP to the target)."""

    def __init__(self, target_port: int, listen_port: int = 0, ssl_context=None) -> None:
        import socket as _socket

        self.target_port = target_port
        self.ssl_context = ssl_context
        if not listen_port:
            with _socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                listen_port = s.getsockname()[1]
        self.port = listen_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = None
        self._conns: set = set()
        self.up()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_w})
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        self._conns.difference_update({writer, up_w})

    async def _up(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True,
                                                  ssl=self.ssl_context)

    async def _down(self):
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def up(self) -> None:
        self._call(self._up())

    def down(self) -> None:
        self._call(self._down())

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
