"""Every change driftrec makes to Faust's own behaviour, in one place.

Each patch names the faust-streaming version it was written against (:data:`FAUST_VERSION`; a
different installed version logs a warning at :func:`apply`, since the patched internals may have
moved) and why it is needed. Subclasses of Faust's classes (the batching transport in
:mod:`driftrec.streams.batching`, the changelog writer in :mod:`driftrec.streams.changelog`) are
extensions, not patches, and live with their role.

1. **Producer buffer flush returns before the buffer is sent** (:func:`apply`, always). Table writes (``table[key] = value``)
   put their changelog messages into Faust's ``ProducerBuffer``; a background task takes them one by
   one and hands them to the Kafka producer. Before committing offsets Faust calls
   ``producer.flush()``, which is ``buffer.flush()`` then the Kafka producer's flush. But
   ``ProducerBuffer.flush`` (1) gives up and returns after 0.1 s without a message being sent, however
   many are still queued, and (2) looks only at the queue, not at the message the background task has
   already taken and is still handing over. Either way the offsets of a batch can be committed while
   some of its changelog messages are not yet with the Kafka producer; a crash at that moment loses
   those table updates for good (the restarted worker recovers the table from the changelog and
   resumes after the committed offsets). Seen here as a restarted worker ending a few clicks short of
   the ground truth after a SIGKILL.

   The fix counts the message in hand and makes ``flush`` wait until the queue is empty *and* no
   message is in hand, with no give-up timeout (a commit must not go ahead of its data; if the broker
   is away, the commit waits with it).

2. **Tansu's end offsets and fetch wait** (:func:`apply_tansu`, only against the embedded broker).
   Tansu answers ListOffsets(latest) with a stale end offset (the platform notes, and
   :func:`driftrec.core.broker.true_end_offsets`), so Faust's table recovery reads the true high
   watermarks from a fetch instead; and Tansu answers a waiting fetch only when its max wait runs
   out, while Faust hard-codes 1,500 ms, so every hop through a worker would wait that long: the
   wait is capped at :data:`TANSU_FETCH_WAIT_MS` for Faust's consumers.

3. **A restarted embedded broker has an empty changelog** (:func:`apply_tansu`). Tansu keeps its
   topics in memory: after a restart a changelog partition starts at offset 0 again, below the
   offset the worker's local store (RocksDB, ``stream.data_dir``) says it has persisted, and Faust's
   recovery refuses to start (``ConsistencyError``). The local store is the newer truth (the state's
   offset marks carry the broker epoch, :mod:`driftrec.streams.state`, so its contents stay valid):
   recovery keeps it and reads the new changelog from its start instead, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata

from driftrec.core.broker import true_end_offsets

log = logging.getLogger(__name__)

#: The faust-streaming release these patches were written and tested against.
FAUST_VERSION = "0.15.3"

_applied = False
#: Faust's own ``ProducerBuffer.flush`` (kept for the regression test that shows the race).
original_flush = None


def _check_version() -> None:
    try:
        installed = metadata.version("faust-streaming")
    except metadata.PackageNotFoundError:  # pragma: no cover - Faust imported from a checkout
        return
    if installed != FAUST_VERSION:
        log.warning("faust-streaming %s is installed; driftrec's Faust patches target %s - check them "
                    "(driftrec.streams.faust_patches)", installed, FAUST_VERSION)


def apply() -> None:
    """Patch Faust's ``ProducerBuffer`` (patch 1; idempotent)."""
    global _applied, original_flush
    if _applied:
        return
    _check_version()
    from faust.transport.producer import ProducerBuffer

    original_flush = ProducerBuffer.flush

    original_send = ProducerBuffer._send_pending

    async def _send_pending(self, fut) -> None:  # type: ignore[no-untyped-def]
        self._driftrec_in_hand = getattr(self, "_driftrec_in_hand", 0) + 1
        try:
            await original_send(self, fut)
        finally:
            self._driftrec_in_hand -= 1
            self.message_sent.set()  # wake flushers even when sending failed

    async def flush(self) -> None:  # type: ignore[no-untyped-def]
        """Return only once every buffered message has been handed to the Kafka producer."""
        while self.size or getattr(self, "_driftrec_in_hand", 0):
            if self.state != "running":  # stopping: as Faust does, refuse only if messages are queued
                if self.size:
                    raise RuntimeError(f"Cannot flush: producer buffer is {self.state}, "
                                       f"{self.size} message(s) not sent")
                return
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except asyncio.TimeoutError:
                pass  # still sending (slow or unreachable broker): keep waiting

    ProducerBuffer._send_pending = _send_pending
    ProducerBuffer.flush = flush
    _applied = True


_patched = False
TANSU_FETCH_WAIT_MS = 20


def apply_tansu() -> None:
    """Patch 2: true end offsets for table recovery and a short fetch wait (idempotent)."""
    global _patched
    if _patched:
        return
    from faust.transport.drivers import aiokafka as faust_aiokafka

    thread_cls = faust_aiokafka.AIOKafkaConsumerThread

    async def _highwaters(self, partitions):
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        return await true_end_offsets(consumer, partitions)

    thread_cls._highwaters = _highwaters

    # a changelog that restarted below the local store's persisted offset (see the module, patch 3)
    from faust.tables import recovery as faust_recovery

    build_offsets = faust_recovery.Recovery._build_offsets

    async def _build_offsets(self, consumer, tps, destination, title):
        await build_offsets(self, consumer, tps, destination, title)
        highwaters = self.active_highwaters if title == "active" else self.standby_highwaters
        for tp in tps:
            persisted, hw = destination.get(tp), highwaters.get(tp)
            if persisted is not None and hw is not None and persisted > hw:
                log.warning("%s: the local store has persisted offset %s, the broker's changelog ends at %s: the "
                            "broker lost its log (a restart of the embedded broker); keeping the local state and "
                            "reading the changelog from its start", tp, persisted, hw)
                destination[tp] = -1

    faust_recovery.Recovery._build_offsets = _build_offsets

    # the fetch wait, capped for Faust's consumers (see the module)
    import types

    import aiokafka

    class _ShortWaitConsumer(aiokafka.AIOKafkaConsumer):
        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), TANSU_FETCH_WAIT_MS)
            super().__init__(*args, **kwargs)

    shim = types.ModuleType("aiokafka")
    shim.__dict__.update(vars(aiokafka))
    shim.AIOKafkaConsumer = _ShortWaitConsumer
    faust_aiokafka.aiokafka = shim
    _patched = True
