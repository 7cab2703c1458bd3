"""The real `Scheduler` and KV cache on a virtual clock, each step as long as a cost model says.

What a deployment would do with a workload, without the model: arrivals join the waiting
queue when the clock passes them, `schedule()` plans a step exactly as in `serve`, the step
takes `step_time(shape)` seconds of virtual time (plus any swap copies), and every request
that samples gets a token. Tokens are never the end-of-sequence token, so a request
generates its trace's `output_len`, as `iterserve bench` asks with `ignore_eos`. Prompts
carry no text, so nothing hits the prefix cache: the simulator runs with it off.

The scheduler keeps its own cost model and learns from the simulated steps, as it learns
from measured ones in `serve`: the slo policy sees what it would see on that hardware. (Under
the policies that never read it, it is not fed: that is most of a step's cost here.)
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from kvcache import KVCacheManager
from scheduler.config import SchedulerConfig
from scheduler.cost_model import StepShape
from scheduler.decode_run import finish_by_length, max_plain_decode_steps, steps_with_room, take_plain_decode_steps
from scheduler.request import Request, RequestRejectedError, RequestStatus, SamplingParams
from scheduler.scheduler import Scheduler

StepTime = Callable[[StepShape], float]
_TOKEN = 1  # every prompt and output token: any id that is no end of sequence


@dataclass(frozen=True, slots=True)
class SimRequest:
    id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    tenant: str = "default"
    priority: int = 0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


@dataclass(slots=True)
class SimOutcome:
    request: SimRequest
    finish_reason: str | None = None  # "length", "timeout", or None when it was refused
    error: str | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # kept only with keep_itl


@dataclass(slots=True)
class SimulationResult:
    outcomes: list[SimOutcome]
    duration_s: float  # from the first arrival to the last finish
    num_steps: int
    num_preemptions: int
    # Steps in which every request computed one output token, by how many did: the batch
    # sizes a CUDA-graph engine would replay (planner.plan_capture_sizes).
    decode_steps_by_batch: Counter[int] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the scheduler runs on: its knobs and the KV cache's size."""

    config: SchedulerConfig
    num_blocks: int
    block_size: int = 16
    num_host_blocks: int = 0
    swap_block_s: float = 0.0  # one block's copy to or from the host pool


def simulate(requests: list[SimRequest], deployment: Deployment, step_time: StepTime,
             keep_itl: bool = True, fast_forward: bool = True) -> SimulationResult:
    """`fast_forward`: take runs of plain decode steps in one go (scheduler/decode_run.py);
    the outcome is the same to the last bit, only faster."""
    kv_cache = KVCacheManager(deployment.num_blocks, deployment.block_size, False, deployment.num_host_blocks)
    clock = _Clock()
    scheduler = Scheduler(deployment.config, kv_cache, clock=clock)
    observe = scheduler.cost_model.observe if scheduler.reads_cost_model else lambda shape, seconds: None
    pending = sorted(requests, key=lambda request: request.arrival_s)
    outcomes = {request.id: SimOutcome(request) for request in pending}
    live: dict[str, Request] = {}
    decode_steps: Counter[int] = Counter()
    num_steps, next_arrival = 0, 0
    clock.now = pending[0].arrival_s if pending else 0.0
    while next_arrival < len(pending) or live:
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= clock.now:
            _admit(pending[next_arrival], scheduler, deployment.config.max_model_len, live, outcomes)
            next_arrival += 1
        if not live:
            if next_arrival < len(pending):
                clock.now = pending[next_arrival].arrival_s
            continue
        if fast_forward:
            next_arrival_s = pending[next_arrival].arrival_s if next_arrival < len(pending) else float("inf")
            num_running = len(scheduler.running)
            num_taken = _take_plain_decode_steps(scheduler, step_time, observe, clock, next_arrival_s, outcomes,
                                                 live, keep_itl)
            if num_taken:
                decode_steps[num_running] += num_taken
                num_steps += num_taken
                continue
        plan = scheduler.schedule()
        for request in plan.timed_out:
            _finish(request, outcomes[request.request_id], live)
        if plan.is_empty:
            # Nothing could run: a static or dynamic batch is filling up (wait for it or for
            # the next arrival), or nothing ever will.
            wait_s = scheduler.seconds_until_launch()
            if next_arrival < len(pending):
                wait_s = min(wait_s or float("inf"), pending[next_arrival].arrival_s - clock.now)
            if not wait_s > 0 or wait_s == float("inf"):
                raise RuntimeError(f"the scheduler planned nothing for {len(live)} unfinished requests at "
                                   f"t={clock.now:.3f} s: is the KV cache smaller than one request?")
            clock.now += wait_s
            continue
        shape = plan.shape()
        if not shape.prefill_tokens:
            decode_steps[shape.decode_seqs] += 1
        seconds = step_time(shape) + (len(plan.swap_out) + len(plan.swap_in)) * deployment.swap_block_s
        clock.now += seconds
        for request in scheduler.update(plan, {s.request.request_id: _TOKEN for s in plan.scheduled if s.samples}):
            _record_token(request, outcomes[request.request_id], live, keep_itl)
        observe(shape, seconds)
        num_steps += 1
    finishes = [o.finished_s for o in outcomes.values() if o.finished_s is not None]
    start = pending[0].arrival_s if pending else 0.0
    return SimulationResult(list(outcomes.values()), max(finishes, default=start) - start, num_steps,
                            scheduler.num_preemptions, decode_steps)


def _take_plain_decode_steps(scheduler: Scheduler, step_time: StepTime, observe: Callable[[StepShape, float], None],
                             clock: "_Clock", next_arrival_s: float, outcomes: dict[str, SimOutcome],
                             live: dict[str, Request], keep_itl: bool) -> int:
    """The plain decode steps that come before the next arrival, taken at once; how many."""
    max_steps = max_plain_decode_steps(scheduler, _TOKEN)
    num_running = len(scheduler.running)
    context = sum(r.num_tokens for r in scheduler.running)
    shapes, seconds, ends = [], [], []
    now = clock.now
    while len(ends) < max_steps and now < next_arrival_s:  # an arrival at a step's start is admitted first
        shape = StepShape(0, num_running, context + len(ends) * num_running)
        shapes.append(shape)
        seconds.append(step_time(shape))
        now += seconds[-1]
        ends.append(now)
    num_steps = steps_with_room(scheduler, len(ends)) if ends else 0
    if not num_steps:
        return 0
    del shapes[num_steps:], seconds[num_steps:], ends[num_steps:]
    for shape, step_s in zip(shapes[:-1], seconds[:-1]):  # each step's plan saw the ones before it
        observe(shape, step_s)
    clock.now = ends[-2] if len(ends) > 1 else clock.now  # the last step starts
    updated = take_plain_decode_steps(scheduler, len(ends), _TOKEN, ends[-1])
    clock.now = ends[-1]
    for request in finish_by_length(scheduler, updated, _TOKEN):
        _finish(request, outcomes[request.request_id], live)
    observe(shapes[-1], seconds[-1])
    for request in updated:
        outcome = outcomes[request.request_id]
        if keep_itl:
            previous = outcome.finished_s
            for end in ends:
                outcome.itl_s.append(end - previous)
                previous = end
        outcome.finished_s = ends[-1]
        outcome.num_output_tokens = len(request.output_token_ids)
    return len(ends)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _admit(item: SimRequest, scheduler: Scheduler, max_model_len: int, live: dict[str, Request],
           outcomes: dict[str, SimOutcome]) -> None:
    outcome = outcomes[item.id]
    if item.prompt_len < 1 or item.output_len < 1 or item.prompt_len + item.output_len > max_model_len:
        outcome.error = (f"prompt {item.prompt_len} + output {item.output_len} tokens do not fit max_model_len "
                         f"{max_model_len}")
        return
    request = Request(item.id, [_TOKEN] * item.prompt_len, SamplingParams(max_tokens=item.output_len, ignore_eos=True),
                      arrival_time=item.arrival_s, priority=item.priority, tenant=item.tenant,
                      slo_ttft_s=item.slo_ttft_s, slo_tpot_s=item.slo_tpot_s)
    try:
        scheduler.add_request(request)
    except RequestRejectedError as error:
        outcome.error = str(error)
        return
    live[item.id] = request


def _record_token(request: Request, outcome: SimOutcome, live: dict[str, Request], keep_itl: bool) -> None:
    """`request` got a token at the end of the step just taken."""
    previous_token_s = outcome.finished_s
    if outcome.first_token_s is None:
        outcome.first_token_s = request.first_token_time
    elif keep_itl:
        outcome.itl_s.append(request.last_token_time - previous_token_s)
    outcome.finished_s = request.last_token_time  # its last token so far
    outcome.num_output_tokens = len(request.output_token_ids)
    if request.is_finished:
        _finish(request, outcome, live)


def _finish(request: Request, outcome: SimOutcome, live: dict[str, Request]) -> None:
    live.pop(request.request_id, None)
    outcome.finish_reason = request.status.finish_reason
    if request.status is RequestStatus.FINISHED_TIMEOUT:
        outcome.error = "timed out"
        outcome.finished_s = request.finished_time
