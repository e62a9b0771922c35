"""Signed control messages: HMAC-SHA256 over the fields that decide what a scorer does.

The trainer signs each adapter announcement (activate / rollback) with ``security.control_key``; a
scorer acts on a Kafka control message only when the signature matches, the message is recent
(``security.control_max_age_s``; replay protection together with the event id, which a scorer
remembers) and, for an activate, the checkpoint then verifies as always. Without a configured key a
scorer acts on no Kafka control message at all (the adapter directory watcher still picks up what the
trainer publishes), so writing to the adapters topic never suffices to change what is served.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from typing import Any, Mapping

SIGNED_FIELDS = ("type", "event_id", "event_time", "domain", "version", "path", "action")
SIGNATURE_FIELD = "signature"

#: why a control message was refused (the label values of driftrec_control_messages_rejected_total)
REASONS = ("malformed", "no_key", "unsigned", "bad_signature", "stale", "replayed")


class Rejected(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def canonical(message: Mapping[str, Any]) -> bytes:
    """The signed bytes: the deciding fields only, in a fixed order and encoding."""
    return json.dumps({k: message.get(k) for k in SIGNED_FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def sign(message: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(message), hashlib.sha256).hexdigest()


def signed(message: Mapping[str, Any], key: bytes | None) -> dict[str, Any]:
    """``message`` with its signature (unchanged without a key)."""
    out = dict(message)
    if key:
        out[SIGNATURE_FIELD] = sign(out, key)
    return out


class Verifier:
    """Checks signature, age and novelty of control messages (one per consumer)."""

    def __init__(self, key: bytes | None, max_age_s: float = 600.0, remember: int = 10_000) -> None:
        self.key = key
        self.max_age_s = max_age_s
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def check(self, message: Mapping[str, Any], now: float) -> None:
        """Raise :class:`Rejected` unless ``message`` may be acted on; remembers its event id."""
        if not self.key:
            raise Rejected("no_key", "no security.control_key configured: Kafka control messages are not acted on")
        sig = message.get(SIGNATURE_FIELD)
        if not isinstance(sig, str) or not sig:
            raise Rejected("unsigned", "control message without a signature")
        if not hmac.compare_digest(sig.encode(), sign(message, self.key).encode()):
            raise Rejected("bad_signature", "control message signature does not match")
        t = message.get("event_time")
        if not isinstance(t, (int, float)) or abs(now - float(t)) > self.max_age_s:
            raise Rejected("stale", f"control message time is more than {self.max_age_s:g} s from now")
        event_id = message.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            raise Rejected("malformed", "signed control message without an event id")
        if event_id in self._seen:
            raise Rejected("replayed", f"control message {event_id} was already applied")
        self._seen[event_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
