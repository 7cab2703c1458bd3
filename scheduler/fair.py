"""Fair share between tenants: the Virtual Token Counter of Sheng et al., "Fairness in Serving
Large Language Models" (OSDI 2024).

Each tenant has a counter of the service it received, in weighted tokens divided by its
weight: a prompt token computed costs `prompt_token_weight`, a token generated
`output_token_weight` (the paper's 1 and 2). The waiting request offered a seat next is
the oldest one of the backlogged tenant with the smallest counter. A tenant that becomes
active (nothing waiting or running before) is lifted to the smallest counter of the
active tenants, so idling earns no credit to spend later. With both always backlogged, two
tenants' counters then differ by at most what the requests admitted in one step can still
receive (tests/scheduler/test_scheduler_policies.py checks that bound on random traces).
"""

from collections import deque
from typing import Iterator

from scheduler.request import Request


class FairShareQueue:
    preempts = False

    def __init__(self, tenant_weights: dict[str, float], prompt_token_weight: float = 1.0,
                 output_token_weight: float = 2.0):
        self.tenant_weights = tenant_weights
        self.prompt_token_weight = prompt_token_weight
        self.output_token_weight = output_token_weight
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[Request]] = {}
        self._live: dict[str, set[str]] = {}  # tenant -> its requests added and not finished

    def add(self, request: Request) -> None:
        tenant = request.tenant
        if not self._live.get(tenant):
            active = [self.counters[other] for other, ids in self._live.items() if ids]
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(active, default=0.0))
        self._live.setdefault(tenant, set()).add(request.request_id)
        self._queues.setdefault(tenant, deque()).append(request)

    def prepend(self, request: Request) -> None:
        self._queues.setdefault(request.tenant, deque()).appendleft(request)

    def _next_tenant(self) -> str:
        return min((tenant for tenant, queue in self._queues.items() if queue),
                   key=lambda tenant: (self.counters[tenant], self._queues[tenant][0].arrival_time))

    def peek(self) -> Request:
        return self._queues[self._next_tenant()][0]

    def pop(self) -> Request:
        return self._queues[self._next_tenant()].popleft()

    def remove(self, request: Request) -> None:
        self._queues[request.tenant].remove(request)

    def rank(self, request: Request) -> tuple:
        return (self.counters.get(request.tenant, 0.0),)

    def victim_rank(self, request: Request) -> tuple:
        # Not the most-served tenant's request: recomputing it charges the other tenant, so
        # the two would take turns preempting each other and neither finish. The request with
        # the least computed loses least, and the one that keeps its blocks only gains on it.
        return (-request.num_computed_tokens,)

    def charge(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        weight = self.tenant_weights.get(request.tenant, 1.0)
        cost = self.prompt_token_weight * num_prompt_tokens + self.output_token_weight * num_output_tokens
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + cost / weight

    def finished(self, request: Request) -> None:
        self._live.get(request.tenant, set()).discard(request.request_id)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def __iter__(self) -> Iterator[Request]:
        # The order pop gives while no service is charged (the batching modes look ahead with
        # it): the least-served tenant's queue first, each queue in its own order.
        tenants = sorted((tenant for tenant, queue in self._queues.items() if queue),
                         key=lambda tenant: (self.counters[tenant], self._queues[tenant][0].arrival_time))
        return (request for tenant in tenants for request in self._queues[tenant])
