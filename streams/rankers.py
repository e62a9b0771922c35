"""Which ranker the recommend stage uses (``ranking.engine``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from driftrec.streams.ranking import LoopRanker, Ranker

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp


def build_ranker(app: "DriftrecApp") -> Ranker:
    """``policy`` (default): :class:`PolicyRanker`, the ranking policy that ``driftrec evaluate`` replays;
    ``loop``: :class:`LoopRanker` (HTTP LM scorer)."""
    if app.settings.ranking.engine == "policy":
        from driftrec.streams.policy_ranker import PolicyRanker

        return PolicyRanker(app)
    return LoopRanker(app)
