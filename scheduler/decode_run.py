"""Runs of plain decode steps taken in one go, for the simulator: the state that many
`schedule()` and `update()` calls would leave, without building their plans.

Between arrivals a busy deployment spends most of its steps giving every running request
one decode token and nothing else; a simulation of 100,000 requests is mostly such steps.
They are plain only when nothing can change who runs: nothing waits (so no admission, no
preemption for a waiting request, no queue timeout, no KV cap binds), every running request
needs exactly one token, nobody has a deadline, the blocks for all the run's tokens are free
(so nobody is preempted for room), and the given token stops nobody. A run may end with a step
that ends someone by length: `finish_by_length` then does what `update()` would.

Only policies whose ranks never change while requests run qualify (fcfs, priority, slo):
the running list is sorted by rank every step, and under sjf or fair a rank moves with the
tokens served, so the order (which decides preemptions later) could differ. The prefix cache
must be off: it indexes blocks as their tokens become known. Nothing here is used by serve.
"""

from typing import TYPE_CHECKING

from scheduler import slo
from scheduler.request import Request

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

STATIC_RANK_POLICIES = ("fcfs", "priority", "slo")


def max_plain_decode_steps(scheduler: "Scheduler", token_id: int) -> int:
    """How many steps from now are sure to be plain decode steps if every sampled token is
    `token_id` and the blocks for them are free (`steps_with_room` says how many are); 0 when
    the next one might not be."""
    config = scheduler.config
    running = scheduler.running
    if (len(scheduler.waiting) or not running or config.policy not in STATIC_RANK_POLICIES
            or config.batching != "continuous" or scheduler.kv_cache.enable_prefix_caching
            or scheduler._num_with_deadline or len(running) > config.max_num_batched_tokens):
        return 0
    max_model_len = config.max_model_len
    steps = max_model_len
    for request in running:
        params = request.sampling_params
        num_tokens, num_computed = request.num_tokens, request.num_computed_tokens
        # One token, and an output one: a prompt's last token would sample its first.
        if (num_tokens - num_computed != 1 or num_computed < len(request.prompt_token_ids)
                or token_id in params.stop_token_ids
                or (not params.ignore_eos and token_id in request.eos_token_ids)):
            return 0
        steps = min(steps, params.max_tokens - len(request.output_token_ids), max_model_len - num_tokens)
    return max(steps, 0)


def steps_with_room(scheduler: "Scheduler", num_steps: int) -> int:
    """The most of `num_steps` plain decode steps whose blocks are free now."""
    num_free = scheduler.kv_cache.pool.num_free_blocks
    # A running request's blocks cover what it computed, so n more tokens need at most
    # ceil(n / block_size) new blocks each: most runs are settled without counting.
    if len(scheduler.running) * -(-num_steps // scheduler.kv_cache.block_size) <= num_free:
        return num_steps
    if _blocks_needed(scheduler, num_steps) <= num_free:
        return num_steps
    low, high = 0, num_steps  # low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _blocks_needed(scheduler, middle) <= num_free else (low, middle)
    return low


def take_plain_decode_steps(scheduler: "Scheduler", num_steps: int, token_id: int, token_time: float) -> list[Request]:
    """Apply `num_steps` plain decode steps (at most `max_plain_decode_steps`, and no more than
    `steps_with_room` allows), the last of which starts now, with the cost model having observed
    all steps but that last; each request's last token came at `token_time`. Returns the
    running requests (all got tokens)."""
    running = scheduler.running
    running.sort(key=scheduler.waiting.rank)  # what the first step's schedule() does; later ones keep it
    if num_steps > 1:
        _advance(scheduler, num_steps - 1, token_id)
    # The last step's plan sets the token budget the slo policy's door check reads next.
    if scheduler.config.policy == "slo":
        scheduler.token_budget = slo.plan_token_budget(scheduler)
    _advance(scheduler, 1, token_id)
    for request in running:
        request.last_token_time = token_time
    return list(running)


def finish_by_length(scheduler: "Scheduler", requests: list[Request], token_id: int) -> list[Request]:
    """After a run, end those of `requests` its last token ended, at the scheduler's clock (the
    last step's end), as `update()` does; returns them."""
    ended = []
    max_model_len = scheduler.config.max_model_len
    for request in requests:
        # The run's token stops nobody (max_plain_decode_steps), so only lengths can end one.
        if (len(request.output_token_ids) < request.sampling_params.max_tokens
                and request.num_tokens < max_model_len):
            continue
        status = scheduler._stop_status(request, token_id)
        if status is not None:
            scheduler._finish(request, status)
            ended.append(request)
    return ended


def _advance(scheduler: "Scheduler", num_steps: int, token_id: int) -> None:
    kv_cache, waiting, kv_caps = scheduler.kv_cache, scheduler.waiting, scheduler.kv_caps
    tokens = [token_id] * num_steps
    for request in scheduler.running:
        blocks = kv_cache.allocate_slots(request, num_steps)
        if blocks is None:
            raise RuntimeError("a plain decode run ran out of blocks: steps_with_room was not asked")
        if blocks:
            kv_caps.gained(request.tenant, len(blocks))
        request.num_computed_tokens += num_steps
        request.extend_output_tokens(tokens)
        waiting.charge(request, 0, num_steps)


def _blocks_needed(scheduler: "Scheduler", num_steps: int) -> int:
    block_size = scheduler.kv_cache.block_size
    num_held = scheduler.kv_cache.num_blocks_held
    return sum(max(0, -(-(r.num_computed_tokens + num_steps) // block_size) - num_held(r.request_id))
               for r in scheduler.running)
