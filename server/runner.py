"""Runs the app under uvicorn, with a graceful drain on SIGTERM.

Uvicorn's own shutdown closes the listening socket first, so new clients would see
"connection refused" rather than an answer. Here the first SIGTERM (or Ctrl+C)
only starts draining: the socket stays open, new requests and /health get 503 (so
a load balancer moves on), requests in flight get `shutdown_timeout_s` to finish,
whatever is left is aborted (its clients see finish_reason "abort"), and only then
does uvicorn shut down. The process exits 0. A second signal exits at once.
"""

import asyncio
import json
import logging
import signal

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import HeadersTooLargeError
from server.middleware import MAX_HEAD_BYTES

logger = logging.getLogger(__name__)

# After the drain, how long uvicorn waits for responses to flush their last bytes.
FLUSH_TIMEOUT_S = 5
# How long a refused connection keeps reading (and dropping) what the client still sends.
LINGER_S = 2.0


class H11WithHeaderLimit(H11Protocol):
    """Uvicorn's h11 protocol, answering an oversized head with 431 and our envelope.

    h11 refuses a head still incomplete at MAX_HEAD_BYTES (one that arrives whole is
    checked by the RequestGate). Uvicorn answers that, as every head h11 cannot parse,
    with a plain 400 and closes at once; a client still sending its headers then gets a
    reset instead of any answer. Here such a head gets 431, the connection is half-closed, and what the client
    still sends is read and dropped for a moment (a lingering close, as nginx does), so
    the answer reaches it.
    """

    lingering = False

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # h11 reports a head over its limit as one more RemoteProtocolError; what it
        # still holds unparsed tells the two apart.
        if len(self.conn.trailing_data[0]) <= MAX_HEAD_BYTES:
            super().send_400_response(msg)
            return
        error = HeadersTooLargeError(f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes")
        body = json.dumps(error.envelope()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=error.status_code, headers=headers), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def uvicorn_config(app: FastAPI, **options) -> uvicorn.Config:
    """The one uvicorn configuration, for `iterserve serve` and the tests' servers alike."""
    return uvicorn.Config(app, http=H11WithHeaderLimit, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          timeout_graceful_shutdown=FLUSH_TIMEOUT_S, **options)


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
    DrainingServer(uvicorn_config(app, host=host, port=port, log_level=log_level), app, shutdown_timeout_s).run()
