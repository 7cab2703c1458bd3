"""Runs the app under uvicorn, with a graceful drain on SIGTERM.

Uvicorn's own shutdown closes the listening socket first, so new clients would see
"connection refused" rather than an answer. Here the first SIGTERM (or Ctrl+C)
only starts draining: the socket stays open, new requests and /health get 503 (so
a load balancer moves on), requests in flight get `shutdown_timeout_s` to finish,
whatever is left is aborted (its clients see finish_reason "abort"), and only then
does uvicorn shut down. The process exits 0. A second signal exits at once.
"""

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)

# After the drain, how long uvicorn waits for responses to flush their last bytes.
FLUSH_TIMEOUT_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout_s: float):
        super().__init__(config)
        self.app = app
        self.shutdown_timeout_s = shutdown_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise SIGTERM after
        # shutdown and the process would die by the signal instead of exiting 0.
        if self._drain_task is not None or self.loop is None or self.loop.is_closed():
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        logger.info("received %s: draining for up to %.0f s", signal.Signals(sig).name, self.shutdown_timeout_s)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self.app, self.shutdown_timeout_s)
        finally:
            self.should_exit = True


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Refuse new work, let requests in flight finish within `timeout_s`, abort the rest."""
    engine = app.state.serving.engine
    engine.draining = True
    if await engine.wait_idle(timeout_s):
        logger.info("drained: every request finished")
        return
    logger.warning("shutdown timeout: aborting %d requests still in flight", engine.num_active_streams)
    engine.abort_all()
    # Aborted streams still send their last chunk and [DONE].
    await engine.wait_idle(FLUSH_TIMEOUT_S)


def run_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float, log_level: str = "info") -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=FLUSH_TIMEOUT_S)
    DrainingServer(config, app, shutdown_timeout_s).run()
