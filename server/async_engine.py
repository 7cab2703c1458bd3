"""The front end of the engine: the door, each HTTP request's output stream, and the engine
loop (server/engine_core.py) on a thread of its own or in a process of its own.

`LLMEngine` is not thread-safe, so only the engine loop touches it: the event loop
sends it commands (add, abort, stop) through a thread-safe inbox, and each step's
outputs come back through the listener methods below, handed to the event loop with
`loop.call_soon_threadsafe`. They run on the engine thread, or in process mode on the
thread that reads the engine process's messages. When no request is unfinished the
loop blocks on its commands, so an idle server burns no CPU; while a static or dynamic
batch fills it waits until the batch is due. A long step never stalls HTTP: the event
loop only parses, streams and detokenizes logprob tokens. The engine sends token ids; they
become text, and stop strings end requests, on the thread that hears each iteration
(server/output_text.py), never on the engine's loop.
"""

import asyncio
from collections import Counter
import logging
import queue
import threading
from typing import Callable

from engine import LLMEngine, RequestOutput
from scheduler.stats import SchedulerStats
from server.engine_core import (
    ABORT, ADD, STOP, Command, CoreOptions, EngineInfo, EngineRequest, EngineThread, Failure, Seats,
)
from server.engine_process import EngineProcess
from server.errors import APIError, EngineError, QueueFullError, ServiceUnavailableError
from server.output_text import OutputText
from server.rate_limit import RateLimited, TokenBucket

logger = logging.getLogger(__name__)

StepObserver = Callable[[list[RequestOutput], SchedulerStats], None]
# Told of every refusal at the door: (tenant, reason, number of sequences). Called on the event
# loop for the queue bounds and rate limits, on the engine thread for the slo policy's refusals.
RejectionObserver = Callable[[str, str, int], None]

class OutputStream:
    """The outputs of one HTTP request's engine requests (several for n > 1 or a list of prompts).

    Iterate it for `RequestOutput`s in arrival order; it ends once every engine
    request has finished. Closing it (leaving its `with` block, however) aborts
    whatever is still running, which is how a client disconnect frees KV blocks.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]):
        self.request_ids = request_ids
        self.unfinished = set(request_ids)  # as the engine sees them
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | APIError] = asyncio.Queue()
        self._num_finished_read = 0
        self._closed = False
        self._not_yet_queued = set(request_ids)  # until the engine thread has taken them in
        self._queued = asyncio.Event()
        self._refusal: APIError | None = None
        self._error: APIError | None = None  # met by take_ready: raised by the next read

    def push(self, item: RequestOutput | APIError) -> None:
        if isinstance(item, RequestOutput) and item.finished:
            self.unfinished.discard(item.request_id)
        if isinstance(item, APIError) and self._refusal is None:
            self._refusal = item
            self._queued.set()
        self._queue.put_nowait(item)

    def mark_queued(self, request_id: str) -> None:
        self._not_yet_queued.discard(request_id)
        if not self._not_yet_queued:
            self._queued.set()

    async def queued(self) -> None:
        """Wait until the engine has queued every request, or raise the error it refused one
        with: a streaming response can then still answer with that error's status (a 429 from
        the slo policy, say) instead of an error event after a 200."""
        await self._queued.wait()
        if self._refusal is not None:
            raise self._refusal

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._num_finished_read == len(self.request_ids):
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, APIError):
            raise item
        if item.finished:
            self._num_finished_read += 1
        return item

    def take_ready(self) -> list[RequestOutput]:
        """The outputs already here, without waiting: when the event loop falls behind the
        engine, a stream can answer several steps in one write. An error stops the taking, and
        the next read raises it."""
        taken = []
        while self._num_finished_read < len(self.request_ids) and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, APIError):
                self._error = item
                break
            if item.finished:
                self._num_finished_read += 1
            taken.append(item)
        return taken

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._release(self)

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncEngine:
    def __init__(self, engine: LLMEngine | EngineThread | EngineProcess, observer: StepObserver | None = None,
                 max_queued_requests: int | None = None, tenant_max_queued: dict[str, int] | None = None,
                 tenant_tokens_per_minute: dict[str, int] | None = None,
                 on_reject: RejectionObserver | None = None, stats_by_tenant: bool = False,
                 tokenizer=None):
        """`engine`: an LLMEngine to run on a thread here, or where to run it. `observer` is
        told of each iteration's outputs and the scheduler's state after it (with per-tenant
        counts when `stats_by_tenant`). `tokenizer` decodes outputs, and nothing else may use
        it (by default: an engine thread's own, which its engine leaves idle, or a new one)."""
        self._runner = engine if isinstance(engine, (EngineThread, EngineProcess)) else EngineThread(engine)
        self.info: EngineInfo = self._runner.info
        if tokenizer is None:
            tokenizer = self._runner.engine.tokenizer if isinstance(self._runner, EngineThread) else _load_tokenizer(
                self.info.model_path)
        self._text = OutputText(tokenizer)
        self.observer = observer
        self.on_reject = on_reject
        self.max_queued_requests = max_queued_requests
        self.tenant_max_queued = tenant_max_queued or {}
        self._buckets = {tenant: TokenBucket(rate) for tenant, rate in (tenant_tokens_per_minute or {}).items()}
        self.draining = False
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, OutputStream] = {}  # engine request id -> stream, event loop only
        self._idle: asyncio.Event | None = None
        # Read by the event loop for admission, written by the engine thread.
        self._lock = threading.Lock()
        self._num_waiting = 0  # the scheduler's waiting queue, as of the last iteration
        self._num_running = 0  # and the seats taken, as of the last iteration
        self._num_in_inbox = 0  # submitted requests the engine thread has not picked up yet
        # With per-tenant bounds: each tenant's requests in the inbox, and in the scheduler's queue.
        self._inbox_by_tenant: Counter[str] = Counter()
        self._waiting_by_tenant: Counter[str] = Counter()
        self._options = CoreOptions(wants_stats=observer is not None, stats_by_tenant=stats_by_tenant,
                                    waiting_by_tenant=bool(self.tenant_max_queued))

    # -- event loop side ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner.start(self, self._take_commands, self._options)

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._runner.is_alive()

    @property
    def refuses_at_queueing(self) -> bool:
        """Whether the scheduler may refuse a valid request when it is queued (the slo policy's
        unreachable targets): streaming responses then wait for the engine to take a request in
        before they start, so a refusal keeps its status. Otherwise they start at once."""
        return self.info.policy == "slo"

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._num_waiting + self._num_in_inbox

    @property
    def num_active_streams(self) -> int:
        return len(set(map(id, self._streams.values())))

    def submit(self, requests: list[EngineRequest]) -> OutputStream:
        """Queue requests that were validated already; raises 503 or 429 instead of queueing."""
        if not self.is_healthy:
            raise ServiceUnavailableError("the engine is not running", code="engine_dead")
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down", code="draining")
        tenant = requests[0].tenant if requests else ""
        try:
            self._admit(requests, tenant)
        except QueueFullError as error:
            self._rejected(tenant, error.code, len(requests))
            raise
        stream = OutputStream(self, [request.request_id for request in requests])
        for request in requests:
            self._streams[request.request_id] = stream
        self._text.start(requests)
        self._idle.clear()
        self._inbox.put((ADD, requests))
        return stream

    def _admit(self, requests: list[EngineRequest], tenant: str) -> None:
        """The door: the queue bounds, then the tenant's token rate; QueueFullError (a 429) if shut."""
        with self._lock:
            num_queued = self._num_queued_with(len(requests))
            if self.max_queued_requests is not None and num_queued > self.max_queued_requests:
                raise QueueFullError(
                    f"the waiting queue is full: with these {len(requests)} sequences {num_queued} would wait for "
                    f"a seat, over the limit of {self.max_queued_requests}; retry later")
            limit = self.tenant_max_queued.get(tenant)
            num_tenant_waiting = self._inbox_by_tenant[tenant] + self._waiting_by_tenant[tenant]
            # A tenant's bound binds only when some of these would wait at all.
            if limit is not None and num_queued and num_tenant_waiting + len(requests) > limit:
                raise QueueFullError(f"tenant {tenant!r} has {num_tenant_waiting} sequences waiting for a seat; "
                                     f"its limit is {limit}; retry later", code="tenant_queue_full")
            bucket = self._buckets.get(tenant)
            if bucket is not None:
                num_tokens = sum(len(r.prompt_token_ids) + r.sampling_params.max_tokens for r in requests)
                try:
                    bucket.take(num_tokens, tenant)
                except RateLimited as error:
                    raise QueueFullError(str(error), retry_after_s=error.retry_after_s,
                                         code="rate_limit_exceeded") from None
            self._num_in_inbox += len(requests)
            self._inbox_by_tenant[tenant] += len(requests)

    def _rejected(self, tenant: str, reason: str, num_sequences: int) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(tenant, reason, num_sequences)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("the rejection observer failed")

    def _num_queued_with(self, num_new: int) -> int:
        """Sequences that would wait for a seat if `num_new` more came now (call with the lock).

        Requests still in the inbox count as waiting, but so do the seats they will
        take: a burst that the engine thread has not picked up yet fills free seats
        first and is refused only for what would really queue behind them.
        """
        num_pending = self._num_waiting + self._num_in_inbox + num_new
        num_free_seats = max(0, self.info.max_num_seqs - self._num_running)
        return max(0, num_pending - num_free_seats)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._inbox.put((ABORT, list(request_ids)))

    def abort_all(self) -> None:
        self.abort([rid for rid, stream in self._streams.items() if rid in stream.unfinished])

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is open; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort whatever is left and end the engine loop (blocking: call it off the event loop)."""
        self._inbox.put((STOP, None))
        self._runner.join(timeout_s)

    def _release(self, stream: OutputStream) -> None:
        for request_id in stream.request_ids:
            self._streams.pop(request_id, None)
        self.abort(sorted(stream.unfinished))
        if not self._streams:
            self._idle.set()

    def _deliver(self, outputs: list[RequestOutput], failures: list[Failure]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.push(output)
        for request_id, error in failures:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.unfinished.discard(request_id)
                stream.push(error)

    def _mark_queued(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.mark_queued(request_id)

    def _fail_all(self, error: APIError) -> None:
        for stream in set(self._streams.values()):
            stream.unfinished.clear()
            stream.push(error)

    # -- told by the engine loop, on its thread or the reader's (EngineCore's CoreListener) --

    def _take_commands(self, timeout_s: float | None) -> list[Command]:
        """Every queued command, after waiting up to `timeout_s` (None: for ever) for the first."""
        commands = []
        if timeout_s is None or timeout_s > 0:
            try:
                commands.append(self._inbox.get(timeout=timeout_s))
            except queue.Empty:
                pass
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def took(self, num_taken: int, taken_by_tenant: Counter[str], seats: Seats) -> None:
        with self._lock:
            self._num_in_inbox -= num_taken
            self._inbox_by_tenant -= taken_by_tenant
            self._set_seats(seats)

    def refused(self, failures: list[Failure]) -> None:
        self._text.forget([request_id for request_id, _ in failures])
        self._call_loop(self._deliver, [], failures)

    def queued(self, request_ids: list[str]) -> None:
        self._call_loop(self._mark_queued, request_ids)

    def rejected(self, tenant: str, reason: str, num_sequences: int) -> None:
        self._rejected(tenant, reason, num_sequences)

    def stepped(self, outputs: list[RequestOutput], seats: Seats, stats: SchedulerStats | None) -> None:
        with self._lock:
            self._set_seats(seats)
        outputs, stopped = self._text.process(outputs)
        if stopped:
            self.abort(stopped)
        if self.observer is not None:
            try:
                self.observer(outputs, stats)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("the step observer failed")
        if outputs:
            self._call_loop(self._deliver, outputs, [])

    def died(self, error: EngineError) -> None:
        self.error = error
        self._text.clear()
        self._call_loop(self._fail_all, error)

    def _set_seats(self, seats: Seats) -> None:
        """The scheduler's queue and seats, for admission on the event loop (call with the lock)."""
        self._num_waiting = seats.num_waiting
        self._num_running = seats.num_running
        if self.tenant_max_queued:
            self._waiting_by_tenant = seats.waiting_by_tenant

    def _call_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
