"""Fault-injection hooks for the fault tests (``tests/e2e/test_faults.py``); inert unless set.

Each hook is an environment variable read once when the worker builds its stages. They exist so that
the fault tests can make a real worker fail in a way no well-formed input can (a stage bug, an output
the broker keeps refusing); nothing in production sets them.

* ``DRIFTREC_FAULT_POISON_EVENT_ID``: the features stage raises :class:`InjectedFault` on the event
  with this id, after applying it to its user's state (a half-applied event: the stage must roll back).
* ``DRIFTREC_FAULT_DEAD_LETTER_FAILURES``: the first N dead-letter sends fail (``-1``: every one) -
  an output that fails, to exercise the acknowledger's retries and its loud stop.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """Raised by a fault-injection hook."""


def poison_event_id() -> str | None:
    return os.environ.get("DRIFTREC_FAULT_POISON_EVENT_ID") or None


def dead_letter_failures() -> int:
    try:
        return int(os.environ.get("DRIFTREC_FAULT_DEAD_LETTER_FAILURES", "0"))
    except ValueError:
        return 0
