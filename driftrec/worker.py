"""``driftrec worker``: one Faust stream worker (ingest, features, recommendations).

With no bootstrap servers configured it joins a running embedded broker (``driftrec broker`` or
``driftrec demo``) or starts its own. Several workers with the same app id share the partitions.
SIGTERM/SIGINT stop it cleanly (offsets of finished batches committed; the rest is redelivered).
"""

from __future__ import annotations

import logging
import sys

from driftrec.core.broker import broker
from driftrec.core.settings import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    import faust

    from driftrec.core.metrics import start_metrics_server
    from driftrec.streams.app import create_app

    with broker(settings, start=True) as bootstrap:
        port = start_metrics_server(settings.metrics.port, settings.metrics.host)
        # Read by tests and the demo: the one line that says where this worker serves metrics.
        print(f"driftrec worker: metrics on {settings.metrics.host}:{port}, broker {bootstrap}", flush=True)
        app = create_app(settings, bootstrap)
        worker = faust.Worker(
            app,
            loglevel=settings.log_level,
            quiet=True,
            redirect_stdouts=False,
            override_logging=False,
        )
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_worker(Settings.load()))
