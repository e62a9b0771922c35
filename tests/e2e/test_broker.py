"""The embedded broker: starts, creates topics, answers over TCP, never outlives its owner."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from driftrec.core.broker import BrokerError, broker, true_end_offsets
from driftrec.core.settings import Settings
from tests.support import ROOT, tansu_pids, wait_until


def test_topics_are_created_with_their_partition_counts(kafka):
    bootstrap, settings = kafka

    async def describe():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([x.name for x in settings.topics.all()])}
        finally:
            await admin.close()

    got = asyncio.run(describe())
    assert got == {t.name: t.partitions for t in settings.topics.all()}


def test_configured_bootstrap_servers_start_nothing(monkeypatch):
    before = tansu_pids()
    s = Settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    with broker(s) as servers:
        assert servers == "127.0.0.1:1"
        assert tansu_pids() == before


def test_start_false_without_a_broker_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("driftrec.core.broker.STATE_FILE", tmp_path / "none.json")
    with pytest.raises(BrokerError, match="driftrec broker"):
        with broker(Settings(), start=False):
            pass


def test_embedded_broker_stops_on_exit_and_with_a_killed_parent(tmp_path):
    # A parent that starts the broker and is then SIGKILLed: the broker must die with it.
    script = textwrap.dedent(
        """
        import sys, time
        from driftrec.core.broker import EmbeddedBroker
        b = EmbeddedBroker().start()
        print(b.proc.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)

    def gone():
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        # a zombie reparented to init counts as gone once reaped; check its state
        with open(f"/proc/{child_pid}/stat") as fh:
            return fh.read().split()[2] == "Z"

    wait_until(gone, timeout=10, message="broker to die with its parent")


def test_ctrl_c_stops_the_broker_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTREC_")}
    proc = subprocess.Popen([sys.executable, "-m", "driftrec.cli", "broker"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "embedded Tansu broker on" in line
    port = line.split(" on ")[1].split()[0].rsplit(":", 1)[1]
    assert any(f"{port}" in open(f"/proc/{p}/cmdline").read() for p in tansu_pids())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    assert not any(f":{port}" in open(f"/proc/{p}/cmdline").read().replace("\0", " ") for p in tansu_pids())


def test_true_end_offsets_fix_tansu_list_offsets(kafka):
    """Tansu's ListOffsets(LATEST) is short after multi-record batches; the fetch high watermark is not."""
    bootstrap, settings = kafka
    topic = settings.topics.events.name
    tp = TopicPartition(topic, 0)

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, enable_idempotence=False)
        await producer.start()
        try:
            for round_ in range(3):  # several multi-record batches
                batch = producer.create_batch()
                for i in range(10):
                    batch.append(key=None, value=f"{round_}-{i}".encode(), timestamp=None)
                await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            reported = (await consumer.end_offsets([tp]))[tp]
            fixed = (await true_end_offsets(consumer, [tp]))[tp]
        finally:
            await consumer.stop()
        return reported, fixed

    reported, fixed = asyncio.run(main())
    assert fixed == 30
    assert reported <= fixed
    print("ListOffsets said", reported, "- true end", fixed)
