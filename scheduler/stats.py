"""The scheduler's state after a step, as plain values: what metrics read, on a thread (or,
later, in a process) other than the one that owns the live scheduler.

`snapshot` copies everything it reports, so the scheduler may change right after; the
per-tenant counts cost a pass over every request, so they are taken only when asked for.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvcache.manager import KVCacheStats
from scheduler.cost_model import Coefficients
from scheduler.request import RequestStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_waiting: int
    num_running: int
    kv_cache: KVCacheStats
    num_preemptions_by_mode: dict[str, int]  # running totals: recompute, swap
    num_blocks_swapped: dict[str, int]  # running totals: out, in
    padding_tokens: int  # running total (static and dynamic batching)
    token_budget: int  # the last step's
    cost_coefficients: Coefficients
    cost_mean_relative_error: float
    # By tenant (only with by_tenant): requests waiting, requests running, KV blocks held.
    waiting_by_tenant: Counter[str] = field(default_factory=Counter)
    running_by_tenant: Counter[str] = field(default_factory=Counter)
    kv_blocks_by_tenant: Counter[str] = field(default_factory=Counter)

    @property
    def num_preemptions(self) -> int:
        return sum(self.num_preemptions_by_mode.values())


def snapshot(scheduler: "Scheduler", by_tenant: bool = False) -> SchedulerStats:
    waiting, running, blocks = Counter(), Counter(), Counter()
    if by_tenant:
        for request in scheduler.requests.values():
            (running if request.status is RequestStatus.RUNNING else waiting)[request.tenant] += 1
            blocks[request.tenant] += scheduler.kv_cache.num_blocks_held(request.request_id)
    cost_model = scheduler.cost_model
    return SchedulerStats(
        num_waiting=scheduler.num_waiting, num_running=scheduler.num_running, kv_cache=scheduler.kv_cache.stats(),
        num_preemptions_by_mode=dict(scheduler.num_preemptions_by_mode),
        num_blocks_swapped=dict(scheduler.num_blocks_swapped), padding_tokens=scheduler.padding_tokens,
        token_budget=scheduler.token_budget, cost_coefficients=cost_model.coefficients,
        cost_mean_relative_error=cost_model.mean_relative_error,
        waiting_by_tenant=waiting, running_by_tenant=running, kv_blocks_by_tenant=blocks)
