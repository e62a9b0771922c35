"""HTTP client for the LM scorer, as the recommend stage uses it: bounded time, typed failures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Sequence

import aiohttp

from driftrec.core import metrics


class ScorerUnavailable(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # scorer_timeout | scorer_error | scorer_unavailable


@dataclass(frozen=True)
class LMRanking:
    items: list[dict[str, Any]]  # [{"item_id", "score", "reason"}], best first
    adapter_version: str
    model_version: str
    domain: str


class ScorerClient:
    def __init__(self, base_url: str, timeout_s: float, down_backoff_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._down_until = 0.0
        self._backoff = down_backoff_s

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def recommend(self, user_id: str, history: Sequence[dict[str, Any]], *, k: int, domain: str | None,
                        exclude: Sequence[str]) -> LMRanking:
        """The LM's top ``k`` over the whole catalogue for this user (cold items included)."""
        if time.monotonic() < self._down_until:
            raise ScorerUnavailable("scorer_unavailable", "backing off after a connection failure")
        body: dict[str, Any] = {"user_id": user_id, "k": k, "history": list(history), "exclude": list(exclude),
                                "exclude_seen": False}
        if domain:
            body["domain"] = domain
        t0 = time.perf_counter()
        try:
            sess = await self._sess()
            async with sess.post(f"{self.base_url}/v1/recommend", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ScorerUnavailable("scorer_error", f"HTTP {resp.status}: {str(data)[:200]}")
        except asyncio.TimeoutError:
            raise ScorerUnavailable("scorer_timeout", f"no answer within {self.timeout.total}s") from None
        except aiohttp.ClientConnectionError as exc:
            self._down_until = time.monotonic() + self._backoff
            raise ScorerUnavailable("scorer_unavailable", str(exc)) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise ScorerUnavailable("scorer_error", str(exc)) from None
        finally:
            metrics.SCORER_CLIENT_SECONDS.observe(time.perf_counter() - t0)
        return LMRanking(data.get("items", []), data.get("adapter_version", ""), data.get("model_version", ""),
                         data.get("domain", domain or "default"))
