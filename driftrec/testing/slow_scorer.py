"""A real HTTP scorer stand-in that answers ``/v1/recommend`` only after ``delay_s`` (a slow scorer; 0 = at once).

It runs an aiohttp server on its own thread's event loop, so a test (sync or async) and a worker in
another process can both call it over TCP; ``calls`` counts the requests that reached it.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from driftrec.core.broker import free_port


class SlowScorer:
    def __init__(self, delay_s: float, items: list[str] | None = None) -> None:
        self.delay_s = delay_s
        self.items = items or ["i0", "i1", "i2"]
        self.calls = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-scorer", daemon=True)

    async def _recommend(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.json()
        await asyncio.sleep(self.delay_s)
        return web.json_response({"items": [{"item_id": i, "score": 1.0 - n / 10, "reason": "slow"}
                                            for n, i in enumerate(self.items)],
                                  "adapter_version": "v1", "model_version": "slow", "domain": "default"})

    async def _calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/recommend", self._recommend)
        app.router.add_get("/calls", self._calls)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> "SlowScorer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the slow scorer did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class SlowScorerProcess:
    """:class:`SlowScorer` in a process of its own (``python -m driftrec.testing.slow_scorer``), so that a busy
    caller (a benchmark producing a backlog) cannot slow its answers down through the GIL."""

    def __init__(self, delay_s: float, items: list[str] | None = None) -> None:
        self.delay_s, self.items = delay_s, items or ["i0", "i1", "i2"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = None

    @property
    def calls(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/calls", timeout=5) as r:
            return int(json.loads(r.read())["calls"])

    def __enter__(self) -> "SlowScorerProcess":
        import subprocess
        import sys
        import time

        self._proc = subprocess.Popen([sys.executable, "-m", "driftrec.testing.slow_scorer", str(self.port),
                                       str(self.delay_s), ",".join(self.items)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.calls
                return self
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("the slow scorer process did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


def _main(argv: list[str]) -> None:
    import threading

    port, delay, items = int(argv[0]), float(argv[1]), argv[2].split(",")
    scorer = SlowScorer(delay, items)
    scorer.port, scorer.url = port, f"http://127.0.0.1:{port}"
    with scorer:
        threading.Event().wait()  # until terminated


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
