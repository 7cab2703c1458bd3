"""The slo policy's plans, from the step cost model (scheduler/cost_model.py): whether a new
request's TTFT target is reachable, and each step's token budget.

The TTFT estimate is the prompt tokens ahead of the request (waiting or running, ranked no
worse: the budget goes in rank order, and equals keep theirs) plus its own uncached prompt,
at the prompt tokens a step holds beside the running decodes, each step timed by the model.
It ignores seats, so it errs toward admitting.
"""

from collections import deque
from typing import TYPE_CHECKING

from scheduler.cost_model import StepShape
from scheduler.request import Request, RequestRejectedError

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

# Plan decode steps to take at most this share of the tightest TPOT target, leaving room
# for the cost model's error.
TPOT_HEADROOM = 0.8
# A decode may spend at most this many TPOT targets of banked time on one step.
TPOT_BANK_TARGETS = 4.0
# A step always has room for this many prompt tokens, so prompts progress however tight
# the targets (one block of SmolLM2 prefill is a few milliseconds on a CPU).
MIN_PREFILL_TOKENS = 16
# When the running decodes alone take longer than the tightest TPOT target allows, holding
# prompts back cannot meet it: prompt tokens may then stretch the step by this fraction.
UNREACHABLE_STRETCH = 0.5
# New prompts leave free the blocks that the running decodes will fill in this many steps,
# so admitting a prompt does not soon preempt a decode (and break its TPOT).
KV_LOOKAHEAD_STEPS = 32
# A prompt that arrives mid-step waits for the step to end: no step takes longer than this
# share of the tightest TTFT target seen in the last TTFT_TARGET_MEMORY_S seconds, so a
# batch job's long prefill steps do not eat a chat prompt's target before it is even queued.
TTFT_STEP_SHARE = 0.6
TTFT_TARGET_MEMORY_S = 60.0


class RecentMinimum:
    """The least value added in the last `window_s` seconds (a monotonic queue: O(1) amortised)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._entries: deque[tuple[float, float]] = deque()  # (time, value), values increasing

    def add(self, now: float, value: float) -> None:
        while self._entries and self._entries[-1][1] >= value:
            self._entries.pop()
        self._entries.append((now, value))

    def get(self, now: float) -> float | None:
        while self._entries and self._entries[0][0] < now - self.window_s:
            self._entries.popleft()
        return self._entries[0][1] if self._entries else None


def is_decoding(request: Request) -> bool:
    return request.num_computed_tokens >= request.num_prompt_tokens


def estimate_ttft(scheduler: "Scheduler", request: Request) -> float:
    """Seconds from now to `request`'s first token if it were queued now."""
    rank = scheduler.waiting.rank
    own_rank = rank(request)
    ahead = sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting if rank(r) <= own_rank)
    decoding = 0
    for r in scheduler.running:
        if is_decoding(r):
            decoding += 1
        elif rank(r) <= own_rank:
            ahead += r.num_tokens - r.num_computed_tokens
    _, num_cached = scheduler.cached_prefix(request)
    own = request.num_tokens - num_cached
    per_step = max(plan_token_budget(scheduler, new_prompt_tokens=own) - decoding, 1)
    num_steps = -(-(ahead + own) // per_step)
    config = scheduler.config
    threshold = config.long_prefill_token_threshold if config.enable_chunked_prefill else 0
    if threshold:
        num_steps = max(num_steps, -(-own // threshold))
    context = sum(r.num_tokens for r in scheduler.running)
    return num_steps * scheduler.cost_model.predict(StepShape(min(per_step, ahead + own), decoding, context))


def check_ttft_reachable(scheduler: "Scheduler", request: Request) -> None:
    """Refuse (RequestRejectedError) or demote to best effort a request whose TTFT target
    cannot be met; nobody, before the cost model has measured enough steps."""
    if not scheduler.cost_model.is_calibrated:
        return
    # Padded by the model's recent error: admitting right at the deadline would miss it
    # whenever steps run slower than predicted.
    estimate = estimate_ttft(scheduler, request) * (1 + scheduler.cost_model.mean_relative_error)
    if scheduler.clock() + estimate <= request.arrival_time + request.slo_ttft_s:
        return
    if scheduler.config.slo_infeasible == "best-effort":
        request.best_effort = True  # queued after the requests that can still make theirs
        return
    raise RequestRejectedError(
        f"the TTFT target of {request.slo_ttft_s * 1000:.0f} ms cannot be met: the work queued ahead and "
        f"this prompt take about {estimate * 1000:.0f} ms more at the measured step times (their recent "
        "error included); retry later or raise the target", code="slo_unreachable")


def tpot_step_allowance(request: Request, now: float) -> float:
    """How long the next step may take with `request`'s TPOT, the mean gap after its first
    token (what goodput counts and clients measure), still within target. Steps faster than
    the target bank the difference, so one longer step may spend it: a prompt's chunk can
    then be larger and fewer steps carry one. At most TPOT_BANK_TARGETS targets are spent at
    once, so the stream never stalls for long; a share of one is held back for the cost
    model's error; a request already behind gets the same step as one on pace."""
    target = request.slo_tpot_s
    if request.first_token_time is None:
        return TPOT_HEADROOM * target
    due = request.first_token_time + target * len(request.output_token_ids)
    return min(max(due - now - (1 - TPOT_HEADROOM) * target, TPOT_HEADROOM * target), TPOT_BANK_TARGETS * target)


def plan_token_budget(scheduler: "Scheduler", new_prompt_tokens: int = 0) -> int:
    """The step's tokens: so that the step takes no longer than the tightest TPOT target of
    the running decodes allows, nor a share of the tightest recent TTFT target, and so that
    new prompt tokens leave the blocks those decodes will soon need. `new_prompt_tokens`:
    plan as if a prompt that long with a TTFT target had just been queued."""
    limit = scheduler.config.max_num_batched_tokens
    decoding = [r for r in scheduler.running if is_decoding(r)]
    now = scheduler.clock()
    allowances = [tpot_step_allowance(r, now) for r in decoding if r.slo_tpot_s is not None]
    prefill, urgent_prefill = limit, 0
    cost_model = scheduler.cost_model
    if cost_model.is_calibrated:
        context = sum(r.num_tokens for r in scheduler.running)
        decodes_only_s = cost_model.predict(StepShape(0, len(decoding), context))
        step_s = float("inf")
        if allowances:
            step_s = min(allowances)
        ttft_target = scheduler.recent_ttft_targets.get(now)
        cap_s = float("inf") if ttft_target is None else ttft_target * TTFT_STEP_SHARE
        step_s = min(step_s, cap_s)
        if decodes_only_s > step_s:
            # The TPOT targets are out of reach however little the step holds: prompts may
            # stretch it by a share, and prompts whose TTFT targets can still be met as far
            # as all of them need (within the TTFT share), rather than miss those too.
            step_s = decodes_only_s * (1 + UNREACHABLE_STRETCH)
            urgent = new_prompt_tokens + sum(
                r.num_tokens - r.num_computed_tokens for r in scheduler.requests.values()
                if r.first_token_time is None and r.slo_ttft_s is not None and not r.best_effort)
            if urgent:
                urgent_s = cost_model.predict(StepShape(urgent, len(decoding), context))
                step_s = max(step_s, min(urgent_s, cap_s))
                if urgent_s <= cap_s:
                    urgent_prefill = urgent  # not one token short by rounding
        if step_s < float("inf"):
            prefill = max(cost_model.prefill_tokens_within(step_s, len(decoding), context), urgent_prefill)
    kv_cache = scheduler.kv_cache
    reserve = -(-len(decoding) * KV_LOOKAHEAD_STEPS // kv_cache.block_size)
    prefill = min(prefill, max(0, kv_cache.pool.num_free_blocks - reserve) * kv_cache.block_size)
    return min(limit, len(decoding) + max(prefill, MIN_PREFILL_TOKENS))
