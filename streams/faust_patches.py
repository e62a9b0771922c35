"""Fixes to faust-streaming 0.15.3 that at-least-once delivery depends on (applied by ``create_app``).

**Producer buffer flush returns before the buffer is sent.** Table writes (``table[key] = value``)
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
"""

from __future__ import annotations

import asyncio

_applied = False
#: Faust's own ``ProducerBuffer.flush`` (kept for the regression test that shows the race).
original_flush = None


def apply() -> None:
    """Patch Faust's ``ProducerBuffer`` (idempotent)."""
    global _applied, original_flush
    if _applied:
        return
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
