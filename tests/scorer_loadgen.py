"""Open-loop HTTP load generator for the scorer load test, run as its own process (no torch import).

``python -m tests.scorer_loadgen < config.json > results.json``; config: url, rate, duration_s,
payloads (list of /v1/score bodies, sent round-robin), swaps, versions, admin_token.
Output: {"responses": [[payload_index, status, adapter_version, [scores...]] ...], "errors": [...],
"latencies": [...], "swaps": n, "elapsed": s}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def main(cfg: dict) -> dict:
    url, rate, duration = cfg["url"], cfg["rate"], cfg["duration_s"]
    payloads, versions = cfg["payloads"], cfg["versions"]
    out: dict = {"responses": [], "errors": [], "latencies": [], "swaps": 0, "swap_errors": []}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def one(n: int) -> None:
            idx = n % len(payloads)
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/score", json=payloads[idx]) as resp:
                    body = await resp.json()
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(repr(exc))
                return
            out["latencies"].append(time.perf_counter() - t0)
            if resp.status != 200:
                out["errors"].append(f"{resp.status}: {body}")
                return
            out["responses"].append([idx, resp.status, body["adapter_version"], [s["score"] for s in body["scores"]]])

        async def swapper() -> None:
            headers = {"Authorization": f"Bearer {cfg['admin_token']}"}
            interval = duration / (cfg["swaps"] + 1)
            for k in range(cfg["swaps"]):
                await asyncio.sleep(interval)
                v = versions[k % len(versions)]
                async with session.post(f"{url}/v1/adapters/default/activate", json={"version": v}, headers=headers) as r:
                    if r.status != 200:
                        out["swap_errors"].append(await r.text())
                    else:
                        out["swaps"] += 1

        swap_task = asyncio.create_task(swapper())
        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * duration)):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
        await swap_task
        out["elapsed"] = time.perf_counter() - start
    return out


if __name__ == "__main__":
    config = json.load(sys.stdin)
    json.dump(asyncio.run(main(config)), sys.stdout)
