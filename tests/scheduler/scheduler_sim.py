"""A virtual clock, a fake model runner and the engine's step loop, for driving Scheduler in tests.

`step` checks the plan's invariants every time, so every scenario that runs through it
also checks the token budget, the seat limit and the block tables.
"""

from typing import Callable

from kvcache import KVCacheManager
from scheduler import Request, RequestStatus, SamplingParams, Scheduler, SchedulerConfig, SchedulerOutput, StepShape

VOCAB = 50
Model = Callable[[Request], int]


class VirtualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def next_token(token_ids: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence, like greedy decoding."""
    return (sum((position + 1) * token for position, token in enumerate(token_ids)) * 7 + len(token_ids)) % VOCAB


def fake_model(request: Request) -> int:
    return next_token(request.all_token_ids)


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What one request generates alone, with no scheduler in the way."""
    token_ids = list(prompt)
    for _ in range(max_tokens):
        token_ids.append(next_token(token_ids))
    return token_ids[len(prompt):]


def make_scheduler(
    max_model_len: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True, num_blocks: int = 64, block_size: int = 4,
    enable_prefix_caching: bool = True, num_host_blocks: int = 0, **batching,
) -> Scheduler:
    """`batching` takes SchedulerConfig's other knobs: batching, static_batch_size, batch_timeout_s,
    long_prefill_token_threshold."""
    config = SchedulerConfig(max_model_len, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, **batching)
    kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
    return Scheduler(config, kv_cache, clock=VirtualClock())


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8, eos: frozenset[int] = frozenset(),
                 **params) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=eos)


def step(scheduler: Scheduler, model: Model = fake_model,
         step_cost: Callable[[StepShape], float] | None = None) -> SchedulerOutput:
    """One engine step: schedule, check the plan, run the fake model, apply its tokens.

    The virtual clock moves a second per step, or `step_cost(shape)` seconds, which the
    scheduler's cost model then observes as the engine's measured step time.
    """
    plan = checked_schedule(scheduler)
    shape = plan.shape()
    sampled = {s.request.request_id: model(s.request) for s in plan.scheduled if s.samples}
    scheduler.update(plan, sampled)
    if step_cost is None:
        scheduler.clock.now += 1.0
    elif not plan.is_empty:
        seconds = step_cost(shape)
        scheduler.cost_model.observe(shape, seconds)
        scheduler.clock.now += seconds
    return plan


def checked_schedule(scheduler: Scheduler) -> SchedulerOutput:
    threshold = scheduler.config.long_prefill_token_threshold
    # A request whose token in flight is its last needs nothing more.
    needs_before = {r.request_id: tokens_to_compute(r) for r in scheduler.running if not ends_with_pending(scheduler, r)}
    if threshold:
        needs_before = {request_id: min(need, threshold) for request_id, need in needs_before.items()}
    plan = scheduler.schedule()
    check_plan(scheduler, plan, needs_before)
    return plan


def tokens_to_compute(request: Request) -> int:
    """Known tokens not yet computed, and under async scheduling the one in flight."""
    return request.num_tokens + request.num_pending_tokens - request.num_computed_tokens


def is_decode(request: Request) -> bool:
    """Whether the request's work this step is one output token: the gate never holds that back."""
    return tokens_to_compute(request) == 1 and request.num_computed_tokens >= request.num_prompt_tokens


def ends_with_pending(scheduler: Scheduler, request: Request) -> bool:
    """Whether the token in flight is the request's last, so it must not be scheduled again."""
    num_output = len(request.output_token_ids) + request.num_pending_tokens
    return request.num_pending_tokens > 0 and (
        num_output >= request.sampling_params.max_tokens
        or request.num_tokens + request.num_pending_tokens >= scheduler.config.max_model_len)


def async_step(scheduler: Scheduler, in_flight: SchedulerOutput | None,
               model: Model = fake_model) -> SchedulerOutput | None:
    """One engine step under async scheduling: schedule the next plan and move it on before
    the plan in flight has its tokens, then apply those (drawn only now: the fake model reads
    the whole sequence, known up to them at last). Returns the new plan in flight."""
    plan = checked_schedule(scheduler)
    if not plan.is_empty:
        scheduler.advance(plan)
    if in_flight is not None:
        sampled = {s.request.request_id: model(s.request) for s in in_flight.scheduled
                   if s.samples and not s.request.is_finished}
        scheduler.update(in_flight, sampled, advanced=True)
    scheduler.clock.now += 1.0
    return None if plan.is_empty else plan


def run(scheduler: Scheduler, model: Model = fake_model, max_steps: int = 2000,
        step_cost: Callable[[StepShape], float] | None = None) -> list[SchedulerOutput]:
    """Step until every request is finished; the pool must then be fully free."""
    plans = []
    while scheduler.has_unfinished_requests():
        assert len(plans) < max_steps, "the scheduler stopped making progress"
        plans.append(step(scheduler, model, step_cost))
    assert_pool_free(scheduler)
    return plans


def assert_pool_free(scheduler: Scheduler) -> None:
    pool = scheduler.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_count == 0 for block in pool.blocks)


def check_plan(scheduler: Scheduler, plan: SchedulerOutput, needs_before: dict[str, int]) -> None:
    config, block_size = scheduler.config, scheduler.kv_cache.block_size
    assert plan.num_batched_tokens <= scheduler.token_budget <= config.max_num_batched_tokens
    assert len(plan.scheduled) <= config.max_num_seqs
    assert scheduler.num_running <= config.max_num_seqs
    scheduled_ids = [s.request.request_id for s in plan.scheduled]
    assert len(set(scheduled_ids)) == len(scheduled_ids)
    assert not set(scheduled_ids) & set(plan.preempted_ids)
    written = set()
    for s in plan.scheduled:
        request = s.request
        assert request in scheduler.running
        assert 1 <= s.num_new_tokens <= tokens_to_compute(request)
        assert len(s.block_ids) * block_size >= request.num_computed_tokens + s.num_new_tokens
        if not config.enable_chunked_prefill:
            assert s.samples, "a prompt was chunked with chunked prefill off"
        # No two requests write the same block in one step.
        first = request.num_computed_tokens // block_size
        last = (request.num_computed_tokens + s.num_new_tokens - 1) // block_size
        blocks_written = set(s.block_ids[first:last + 1])
        assert not written & blocks_written
        written |= blocks_written
    # Running requests are served first (after waiting ones that outrank them, admitted ahead):
    # if all of them fit the budget and the pool, all run (each prompt at most the long-prefill
    # threshold), but for those whose deadline passed and those a tenant's KV cap holds back.
    timed_out = {request.request_id for request in plan.timed_out}
    assert all(request.is_finished and request not in scheduler.running for request in plan.timed_out)
    needs_before = {request_id: need for request_id, need in needs_before.items() if request_id not in timed_out}
    ahead = 0
    for s in plan.scheduled:
        if s.request.request_id in needs_before:
            break
        ahead += s.num_new_tokens
    if config.tenant_kv_fractions:
        return
    if config.policy == "priority":
        # Prompt work of a worse priority that ranks below one of the step's prompts waits
        # (scheduler/prefill_gate.py).
        rank, requests = scheduler.waiting.rank, scheduler.requests
        prompts = [s.request for s in plan.scheduled if not is_decode(s.request)]

        def held_back(request: Request) -> bool:
            return not is_decode(request) and any(
                other.priority < request.priority and rank(other) < rank(request) for other in prompts)

        needs_before = {request_id: need for request_id, need in needs_before.items()
                        if not held_back(requests[request_id])}
    if not plan.preempted_ids and ahead + sum(needs_before.values()) <= scheduler.token_budget:
        served = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
        assert all(served.get(request_id) == need for request_id, need in needs_before.items())


def replay(scheduler: Scheduler, requests: list[Request], specs: list[dict], aborts: dict[int, int],
           max_steps: int = 3000, async_scheduling: bool = False):
    """Drive a generated workload: arrivals and aborts at their steps, then one step (with
    `async_scheduling`, aborts land while a step is in flight).

    Yields (the request aborted before this step, or None; the step's plan, or the plan
    launched by it under async scheduling, None if none was).
    """
    last_arrival = max(spec["arrival_step"] for spec in specs)
    step_index = 0
    in_flight = None
    while scheduler.has_unfinished_requests() or step_index <= last_arrival or in_flight is not None:
        assert step_index < max_steps, "the scheduler stopped making progress"
        for request, spec in zip(requests, specs):
            if spec["arrival_step"] == step_index:
                scheduler.add_request(request)
        victim = requests[aborts[step_index]] if step_index in aborts else None
        aborted = victim if victim is not None and scheduler.abort(victim.request_id) else None
        if async_scheduling:
            in_flight = async_step(scheduler, in_flight)
            yield aborted, in_flight
        else:
            yield aborted, step(scheduler)
        step_index += 1


def assert_replay_outputs(requests: list[Request], specs: list[dict], aborted: set[str], max_model_len: int) -> None:
    """Aborted requests ended as aborts; every other one generated exactly what it would alone."""
    for request, spec in zip(requests, specs):
        if request.request_id in aborted:
            assert request.status is RequestStatus.FINISHED_ABORTED
            continue
        num_generated = min(spec["max_tokens"], max_model_len - len(spec["prompt"]))
        assert request.output_token_ids == reference_output(spec["prompt"], num_generated)
        assert request.status is RequestStatus.FINISHED_LENGTH
