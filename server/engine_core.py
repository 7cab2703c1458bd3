"""The engine's side of the server: commands in, and what each iteration did out.

`EngineCore.run` is the loop: take the commands that came (waiting for one when nothing is
left to do), apply them, step the engine while work is left, and tell the front end. Only
the thread that runs it touches the `LLMEngine`. Everything it tells the front end goes
through the `CoreListener` methods, each with plain values (outputs, errors, counts, a
stats snapshot): the seam along which the engine can move to a process of its own
(issue 10), where each call becomes a message. Outputs carry token ids, not text: the
front end decodes them and finds stop strings, off the engine's loop.

Where it runs is an `EngineThread` (here) or an `EngineProcess` (server/engine_process.py):
both take the listener and a `take_commands` to start, and say whether the core is alive.
"""

from collections import Counter
from dataclasses import dataclass, field
import logging
import threading
import time
from typing import Callable, Protocol

from engine import LLMEngine, RequestOutput
from engine.llm_engine import check_logit_bias, check_prompt
from scheduler import InvalidRequestError, RequestRejectedError, SamplingParams
from scheduler.stats import SchedulerStats, snapshot
from server.errors import APIError, EngineError, QueueFullError, from_invalid_request

logger = logging.getLogger(__name__)

ADD, ABORT, STOP = "add", "abort", "stop"
Command = tuple[str, object]  # (ADD, [EngineRequest]), (ABORT, [request id]), (STOP, None)
Failure = tuple[str, APIError]  # a request the engine refused or failed, and why


@dataclass(slots=True)
class EngineRequest:
    """One engine request, as it crosses from the front end to the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    tenant: str = ""
    cache_salt: str = ""
    deadline: float | None = None  # time.monotonic() by which it must finish
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the front end needs to know of the engine, as plain values: an engine process
    sends it once, when its model is loaded."""

    model_path: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    policy: str
    device: str
    dtype: str
    paths: dict[str, str]
    block_size: int
    num_kv_blocks: int
    kv_bytes_per_block: int
    kv_cache_dtype: str

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineInfo":
        return cls(str(engine.model_path), engine.max_model_len, engine.vocab_size,
                   engine.scheduler.config.max_num_seqs, engine.scheduler.config.policy, str(engine.device),
                   str(engine.dtype).removeprefix("torch."), dict(engine.paths), engine.kv_cache.block_size,
                   engine.kv_cache.pool.num_blocks, engine.kv_bytes_per_block,
                   engine.kv_cache_dtype_name)

    def check_prompt(self, token_ids: list[int]) -> None:
        check_prompt(token_ids, self.vocab_size, self.max_model_len)

    def check_logit_bias(self, params: SamplingParams) -> None:
        check_logit_bias(params, self.vocab_size)


@dataclass(frozen=True, slots=True)
class CoreOptions:
    """What the front end wants told after each iteration (see EngineCore)."""

    wants_stats: bool = False
    stats_by_tenant: bool = False
    waiting_by_tenant: bool = False


@dataclass(slots=True)
class Seats:
    """The scheduler's queue and seats after an iteration, for the front end's door."""

    num_waiting: int
    num_running: int
    waiting_by_tenant: Counter[str] = field(default_factory=Counter)  # only when asked for


class CoreListener(Protocol):
    def took(self, num_taken: int, taken_by_tenant: Counter[str], seats: Seats) -> None:
        """Requests taken in this iteration, and the seats after: one update, so the door
        never sees them gone from the inbox before they are in the queue."""

    def refused(self, failures: list[Failure]) -> None:
        """Requests refused on arrival, before the step (a stream waiting to start hears at once)."""

    def queued(self, request_ids: list[str]) -> None:
        """Requests the engine holds now."""

    def rejected(self, tenant: str, reason: str, num_sequences: int) -> None:
        """A refusal by the scheduler (the slo policy's unreachable targets), for metrics."""

    def stepped(self, outputs: list[RequestOutput], seats: Seats, stats: SchedulerStats | None) -> None:
        """The iteration's outputs, the seats after it, and its stats when asked for."""

    def died(self, error: EngineError) -> None:
        """The loop ended on an error: every request in flight is lost."""


class EngineCore:
    def __init__(self, engine: LLMEngine, listener: CoreListener, options: CoreOptions = CoreOptions()):
        self.engine = engine
        # The loop times whole iterations for the cost model itself (see run).
        engine.observe_steps = False
        # Text is the front end's (AsyncEngine): outputs carry token ids, and a stop string
        # found there comes back as an abort.
        engine.detokenize = False
        self.listener = listener
        self.wants_stats = options.wants_stats
        self.stats_by_tenant = options.stats_by_tenant
        self.waiting_by_tenant = options.waiting_by_tenant
        self._live: set[str] = set()  # added and not yet finished

    def run(self, take_commands: Callable[[float | None], list[Command]]) -> None:
        """Until a STOP: `take_commands(timeout_s)` waits up to that long (None: for ever) for
        the first command and returns every one queued."""
        try:
            stopping = False
            while not stopping:
                idle = not self.engine.has_unfinished_requests()
                commands = take_commands(None if idle else self.engine.scheduler.seconds_until_launch())
                outputs, stopping = self._apply(commands)
                queued = [request.request_id for kind, payload in commands if kind == ADD for request in payload]
                if queued:
                    self.listener.queued(queued)
                stepped = not stopping and self.engine.has_unfinished_requests()
                started = time.perf_counter()
                if stepped:
                    outputs.extend(self.engine.step())
                self._publish(outputs)
                # Timed whole, publishing included: under HTTP load an iteration takes longer than
                # the engine's step alone (BENCHMARKS.md, issue 12), and that is what TPOT is made of.
                if stepped and self.engine.last_step_shape is not None:
                    self.engine.scheduler.cost_model.observe(self.engine.last_step_shape,
                                                             time.perf_counter() - started)
        except BaseException as error:  # noqa: BLE001 - reported through /health and to every stream
            logger.exception("the engine loop died")
            self.listener.died(EngineError(f"the engine stopped: {type(error).__name__}: {error}"))

    def _apply(self, commands: list[Command]) -> tuple[list[RequestOutput], bool]:
        outputs: list[RequestOutput] = []
        failures: list[Failure] = []
        num_taken = 0
        taken_by_tenant: Counter[str] = Counter()
        stopping = False
        for kind, payload in commands:
            if kind == ADD:
                num_taken += len(payload)
                taken_by_tenant.update(request.tenant for request in payload)
                failures.extend(self._add(payload))
            elif kind == ABORT:
                outputs.extend(self._abort(payload))
            else:
                stopping = True
        if stopping:
            outputs.extend(self._abort(sorted(self._live)))
        if commands:
            self.listener.took(num_taken, taken_by_tenant, self._seats())
        if failures:
            self.listener.refused(failures)
        return outputs, stopping

    def _add(self, requests: list[EngineRequest]) -> list[Failure]:
        failures = []
        for request in requests:
            try:
                self.engine.add_request(
                    request.prompt_token_ids, request.sampling_params, request_id=request.request_id,
                    arrival_time=request.arrival_time, priority=request.priority, tenant=request.tenant,
                    cache_salt=request.cache_salt, deadline=request.deadline, slo_ttft_s=request.slo_ttft_s,
                    slo_tpot_s=request.slo_tpot_s)
                self._live.add(request.request_id)
            except InvalidRequestError as error:
                failures.append((request.request_id, from_invalid_request(error)))
            except RequestRejectedError as error:
                failures.append((request.request_id, QueueFullError(str(error), code=error.code)))
                self.listener.rejected(request.tenant, error.code, 1)
            except Exception as error:  # noqa: BLE001 - e.g. a duplicate id: fail this request only
                failures.append((request.request_id, EngineError(f"{type(error).__name__}: {error}")))
        return failures

    def _abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            output = self.engine.abort(request_id)
            if output is not None:
                outputs.append(output)
        return outputs

    def _seats(self) -> Seats:
        scheduler = self.engine.scheduler
        by_tenant = Counter(request.tenant for request in scheduler.waiting) if self.waiting_by_tenant else Counter()
        return Seats(scheduler.num_waiting, scheduler.num_running, by_tenant)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        stats = snapshot(self.engine.scheduler, self.stats_by_tenant) if self.wants_stats else None
        self.listener.stepped(outputs, self._seats(), stats)


class EngineThread:
    """The engine core on a thread of this process (the default; tests look inside it)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self._thread: threading.Thread | None = None

    def start(self, listener: CoreListener, take_commands: Callable[[float | None], list[Command]],
              options: CoreOptions) -> None:
        core = EngineCore(self.engine, listener, options)
        self._thread = threading.Thread(target=core.run, args=(take_commands,), name="iterserve-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
