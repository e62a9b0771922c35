"""HTTP client for the LM scorer, as the recommend stage uses it: bounded time, typed failures, a circuit breaker.

Every call is bounded by ``scorer.timeout_s``. A slow or failing scorer must not cost that time on every
request, so the client keeps a :class:`CircuitBreaker`: ``scorer.circuit_failures`` consecutive failures
(or one refused connection) open it, and for ``scorer.circuit_open_s`` every call fails at once with
``scorer_circuit_open`` (the recommend stage answers from the flagged fallback) without touching the
scorer. Then one trial call is let through (the others keep failing fast): a success closes the
circuit, a failure opens it again. ``driftrec_scorer_circuit_open`` (0/1) and
``driftrec_scorer_circuit_opens_total`` show it.
"""

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
        self.reason = reason  # scorer_timeout | scorer_error | scorer_unavailable | scorer_circuit_open


class CircuitBreaker:
    """closed -> (``failures`` in a row, or a hard failure) -> open for ``open_s`` -> one trial -> closed/open."""

    def __init__(self, failures: int = 3, open_s: float = 10.0, clock=time.monotonic) -> None:
        if failures < 1 or open_s <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and open_s > 0")
        self.failures, self.open_s, self.clock = failures, open_s, clock
        self.consecutive = 0
        self.open_until = 0.0
        self.trial = False  # a trial call is in flight (half-open)
        self.opened = 0

    @property
    def state(self) -> str:
        if not self.open_until:
            return "closed"
        return "open" if not self.trial and self.clock() < self.open_until else "half_open"

    def allow(self) -> bool:
        """May a call go to the scorer now? (In the half-open state only the first caller gets a yes.)"""
        if not self.open_until:
            return True
        if self.trial or self.clock() < self.open_until:
            return False
        self.trial = True
        return True

    def success(self) -> None:
        self.consecutive, self.open_until, self.trial = 0, 0.0, False
        metrics.SCORER_CIRCUIT_OPEN.set(0)

    def failure(self, hard: bool = False) -> None:
        self.consecutive += 1
        if hard or self.trial or self.consecutive >= self.failures:
            if not self.open_until or self.trial:
                self.opened += 1
                metrics.SCORER_CIRCUIT_OPENS.inc()
            self.open_until = self.clock() + self.open_s
            self.trial = False
            metrics.SCORER_CIRCUIT_OPEN.set(1)


@dataclass(frozen=True)
class LMRanking:
    items: list[dict[str, Any]]  # [{"item_id", "score", "reason"}], best first
    adapter_version: str
    model_version: str
    domain: str


class ScorerClient:
    def __init__(self, base_url: str, timeout_s: float, *, circuit_failures: int = 3,
                 circuit_open_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.breaker = CircuitBreaker(circuit_failures, circuit_open_s)
        self.calls = 0  # calls that went to the scorer

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
        if not self.breaker.allow():
            raise ScorerUnavailable("scorer_circuit_open", "the scorer failed recently; not called until the circuit closes")
        self.calls += 1
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
        except ScorerUnavailable:
            self.breaker.failure()
            raise
        except asyncio.TimeoutError:
            self.breaker.failure()
            raise ScorerUnavailable("scorer_timeout", f"no answer within {self.timeout.total}s") from None
        except aiohttp.ClientConnectionError as exc:
            self.breaker.failure(hard=True)
            raise ScorerUnavailable("scorer_unavailable", str(exc)) from None
        except (aiohttp.ClientError, ValueError) as exc:
            self.breaker.failure()
            raise ScorerUnavailable("scorer_error", str(exc)) from None
        except asyncio.CancelledError:
            # cancelled by the stage's deadline: no verdict on the scorer, but a trial slot must be freed
            self.breaker.trial = False
            raise
        finally:
            metrics.SCORER_CLIENT_SECONDS.observe(time.perf_counter() - t0)
        self.breaker.success()
        return LMRanking(data.get("items", []), data.get("adapter_version", ""), data.get("model_version", ""),
                         data.get("domain", domain or "default"))
