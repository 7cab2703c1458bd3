"""Preemption: which running request gives up its seat and KV blocks, and what becomes of
its KV (swapped to the host pool and brought back later, or dropped and recomputed).

Three things take a seat away: a running request that needs blocks none are free for (the
worst one not yet scheduled this step gives way, `allocate_or_preempt`), a waiting request
that outranks a running one under a preemptive policy (`make_room_for_waiting`), and a
tenant over its KV cap while others wait (`enforce_kv_caps`). The victim is always the
worst by the policy's rank, the last admitted among equals (all of them under FCFS).
"""

from typing import TYPE_CHECKING, Callable

from scheduler.output import SchedulerOutput
from scheduler.request import Request, RequestStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


def worst_running(scheduler: "Scheduler", start: int = 0,
                  rank: Callable[[Request], tuple] | None = None) -> Request:
    """The worst of running[start:] by `rank` (the policy's by default), the last among
    equals; with KV caps, a request of a tenant over its cap comes first."""
    rank = rank or scheduler.waiting.rank
    running, kv_caps = scheduler.running, scheduler.kv_caps
    if kv_caps:
        def key(i: int) -> tuple:
            return (kv_caps.over(running[i].tenant), rank(running[i]), i)
    else:
        def key(i: int) -> tuple:
            return (rank(running[i]), i)
    return running[max(range(start, len(running)), key=key)]


def preempt(scheduler: "Scheduler", request: Request, output: SchedulerOutput) -> None:
    """Take a running request's seat and blocks: its KV goes to the swap pool when it is long
    enough to be worth the copy (and fits), else it is dropped and recomputed later."""
    kv_cache = scheduler.kv_cache
    scheduler.running.remove(request)
    if scheduler.kv_caps:
        scheduler.kv_caps.released(request)
    threshold = scheduler.config.swap_threshold_tokens
    if threshold is not None and request.num_computed_tokens >= threshold and kv_cache.can_swap_out(request):
        pairs = kv_cache.swap_out(request)
        output.swap_out.extend(pairs)
        scheduler.num_blocks_swapped["out"] += len(pairs)
        scheduler.num_preemptions_by_mode["swap"] += 1
    else:
        kv_cache.free(request)
        request.num_computed_tokens = 0
        scheduler.num_preemptions_by_mode["recompute"] += 1
    request.status = RequestStatus.PREEMPTED
    request.num_preemptions += 1
    output.preempted_ids.append(request.request_id)
    scheduler.waiting.prepend(request)


def allocate_or_preempt(scheduler: "Scheduler", index: int, num_new: int, output: SchedulerOutput) -> bool:
    """Blocks for running[index], preempting the worst request by the policy's victim rank
    not yet scheduled this step until they fit; False if the request itself gave way."""
    request = scheduler.running[index]
    while (blocks := scheduler.kv_cache.allocate_slots(request, num_new)) is None:
        victim = worst_running(scheduler, start=index, rank=scheduler.waiting.victim_rank)
        preempt(scheduler, victim, output)
        if victim is request:
            return False
    scheduler.kv_caps.gained(request.tenant, len(blocks))
    return True


def make_room_for_waiting(scheduler: "Scheduler", output: SchedulerOutput) -> None:
    """Preemptive policies: while the best waiting request finds no seat or no blocks for its
    first chunk, the worst running request it outranks gives them up."""
    config, kv_cache, waiting = scheduler.config, scheduler.kv_cache, scheduler.waiting
    while waiting and scheduler.running:
        request = scheduler.next_admissible()
        if request is None:
            return
        num_first = min(request.num_tokens, config.max_num_batched_tokens)
        if scheduler.kv_caps.holds_back(request, num_first, 0):
            return  # its tenant's cap would hold it back anyway
        num_blocks = -(-num_first // kv_cache.block_size)
        if len(scheduler.running) < config.max_num_seqs and num_blocks <= kv_cache.pool.num_free_blocks:
            return
        victim = worst_running(scheduler)
        if not waiting.rank(request) < waiting.rank(victim):
            return
        preempt(scheduler, victim, output)


def enforce_kv_caps(scheduler: "Scheduler", output: SchedulerOutput) -> None:
    """Tenants over their cap while others wait give blocks back, worst-ranked request first."""
    kv_caps = scheduler.kv_caps
    for tenant in list(kv_caps.binding):  # preempting may widen it
        while kv_caps.over(tenant):
            victims = [r for r in scheduler.running if r.tenant == tenant]
            if not victims:
                break
            preempt(scheduler, max(victims, key=scheduler.waiting.rank), output)


def swap_in(scheduler: "Scheduler", request: Request, num_new: int, output: SchedulerOutput) -> bool:
    """Bring a swapped-out request back with room for `num_new` tokens; False if they do not fit."""
    kv_cache = scheduler.kv_cache
    num_blocks = -(-(request.num_computed_tokens + num_new) // kv_cache.block_size)
    if num_blocks > kv_cache.pool.num_free_blocks:
        return False
    pairs = kv_cache.swap_in(request)
    kv_cache.allocate_slots(request, num_new)  # cannot fail: the room was counted above
    output.swap_in.extend(pairs)
    scheduler.num_blocks_swapped["in"] += len(pairs)
    return True
