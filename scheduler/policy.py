"""Waiting-queue policies: the order in which waiting requests are offered seats, and who
gives a seat up.

A policy is a queue with a few extra duties:
- `prepend` puts a preempted request back: FCFS considers it first; the ranked
  policies give it back the place its rank says (priority, then arrival), which for a
  request that waited is near the front;
- `rank` orders requests, lowest first, so the scheduler can tell whether a waiting
  request outranks a running one (`preempts` policies take the seat);
- `victim_rank` says which running request gives its blocks up when they run out: the
  worst, the last admitted among equals. It is the rank wherever ranks are static; under
  fair share, whose ranks move as service is charged, it is the least progress, since two
  requests that took turns preempting each other would both be recomputed forever;
- `charge` and `finished` let a policy account service (the fair-share policy does).

The slo policy orders by TTFT deadline (arrival plus the request's TTFT target), earliest
first; a request without a target is best effort, its deadline `aging_s` after arrival,
so it is overtaken only by requests that arrive within that long after it.

Aging keeps the ranked policies from starving anyone: a request's effective priority
improves by one level per `aging_s` seconds waited. Since every waiting request ages at
the same rate, the order by `priority + arrival / aging_s` never changes with time, so
it is a static key. A request is then overtaken only by requests that arrive within
`(its priority - the best priority) * aging_s` seconds after it: past that, it is served
before everything that comes later.
"""

from collections import deque
from dataclasses import dataclass
import heapq
from itertools import count
from typing import Callable, Iterator, Protocol

from scheduler.fair import FairShareQueue
from scheduler.request import Request

POLICIES = ("fcfs", "priority", "sjf", "fair", "slo")
DEFAULT_AGING_S = 60.0
# Shortest-job-first counts this many tokens of remaining work as one priority level.
SJF_TOKENS_PER_LEVEL = 256


class WaitingQueue(Protocol):
    preempts: bool  # whether a waiting request may take the seat of a running one it outranks

    def add(self, request: Request) -> None: ...
    def prepend(self, request: Request) -> None: ...
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def rank(self, request: Request) -> tuple: ...
    def victim_rank(self, request: Request) -> tuple: ...
    def charge(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None: ...
    def finished(self, request: Request) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue:
    """First come, first served; a preempted request goes back to the front."""

    preempts = False

    def __init__(self):
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def rank(self, request: Request) -> tuple:
        return ()  # all equal: the last admitted is preempted first

    def victim_rank(self, request: Request) -> tuple:
        return ()

    def charge(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        pass

    def finished(self, request: Request) -> None:
        pass

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


@dataclass(slots=True)
class _Entry:
    key: tuple
    order: int
    request: Request
    valid: bool = True

    def __lt__(self, other: "_Entry") -> bool:
        return (self.key, self.order) < (other.key, other.order)


class RankedQueue:
    """A heap on a static key, lowest first; ties go to the earlier arrival, then to a request
    put back (`prepend`: the last put back first), then to the earlier add."""

    preempts = False

    def __init__(self, aging_s: float | None):
        self.aging_s = aging_s
        self._heap: list[_Entry] = []
        self._entries: dict[str, _Entry] = {}
        self._order = count()
        self._front = count(-1, -1)  # orders for requests put back, before every add

    def level(self, request: Request) -> float:
        raise NotImplementedError

    def rank(self, request: Request) -> tuple:
        if self.aging_s is None:
            return (self.level(request), request.arrival_time)
        return (self.level(request) + request.arrival_time / self.aging_s, request.arrival_time)

    def victim_rank(self, request: Request) -> tuple:
        return self.rank(request)

    def add(self, request: Request, order: int | None = None) -> None:
        entry = _Entry(self.rank(request), next(self._order) if order is None else order, request)
        self._entries[request.request_id] = entry
        heapq.heappush(self._heap, entry)

    def prepend(self, request: Request) -> None:
        # The rank decides the place; among equals a request put back goes first, as FCFS puts
        # it at the front: a preempted request resumes before its equals that never ran, and a
        # launched static batch's members stay ahead of those left for the next batch.
        self.add(request, next(self._front))

    def peek(self) -> Request:
        while not self._heap[0].valid:
            heapq.heappop(self._heap)
        return self._heap[0].request

    def pop(self) -> Request:
        request = self.peek()
        heapq.heappop(self._heap)
        del self._entries[request.request_id]
        return request

    def remove(self, request: Request) -> None:
        self._entries.pop(request.request_id).valid = False

    def charge(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        pass

    def finished(self, request: Request) -> None:
        pass

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        return (entry.request for entry in sorted(self._entries.values()))


class PriorityQueue(RankedQueue):
    """Lower `priority` first (as in vLLM), aged; an arrival that outranks a running request
    takes its seat, or its blocks, when they run out."""

    preempts = True

    def level(self, request: Request) -> float:
        return request.priority


class ShortestJobQueue(RankedQueue):
    """Least estimated remaining work first, aged: prompt tokens still to compute plus output
    tokens still allowed, each output token counted as `output_token_cost()` prompt tokens
    (the cost model's ratio of a decode to a prompt token: about 1.5 on a CPU, far more on a
    GPU, where decoding is bound by memory). A waiting request's key is taken when it is
    queued. Not preemptive: recomputing a preempted long job would cost more than the short
    one gains."""

    def __init__(self, aging_s: float | None, output_token_cost: Callable[[], float] = lambda: 1.0):
        super().__init__(aging_s)
        self.output_token_cost = output_token_cost

    def level(self, request: Request) -> float:
        num_prompt_left = request.num_tokens - request.num_computed_tokens
        num_output_left = request.sampling_params.max_tokens - len(request.output_token_ids)
        return (num_prompt_left + num_output_left * self.output_token_cost()) / SJF_TOKENS_PER_LEVEL


class DeadlineQueue(RankedQueue):
    """Earliest TTFT deadline first; preemptive, like priority: an arrival whose deadline
    comes sooner takes the seat, or the blocks, of the running request whose deadline is
    latest (best-effort requests first)."""

    preempts = True

    def rank(self, request: Request) -> tuple:
        return (self.deadline(request), request.arrival_time)

    def deadline(self, request: Request) -> float:
        if request.slo_ttft_s is not None and not request.best_effort:
            return request.arrival_time + request.slo_ttft_s
        return request.arrival_time + (self.aging_s if self.aging_s is not None else float("inf"))


def make_waiting_queue(policy: str, aging_s: float | None = DEFAULT_AGING_S,
                       tenant_weights: dict[str, float] | None = None,
                       output_token_cost: Callable[[], float] = lambda: 1.0) -> WaitingQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue(aging_s)
    if policy == "sjf":
        return ShortestJobQueue(aging_s, output_token_cost)
    if policy == "fair":
        return FairShareQueue(tenant_weights or {})
    if policy == "slo":
        return DeadlineQueue(aging_s)
    raise ValueError(f"unknown scheduling policy {policy!r}; known: {', '.join(POLICIES)}")
