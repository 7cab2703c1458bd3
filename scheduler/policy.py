"""Waiting-queue policies: the order in which waiting requests are offered seats.

A policy is a queue with one extra duty: `prepend` puts a preempted request back
where it will be considered first, whatever the policy, so recompute never starves.
Priority, fair-share and SLO-aware policies plug in here.
"""

from collections import deque
from typing import Iterator, Protocol

from scheduler.request import Request


class WaitingQueue(Protocol):
    def add(self, request: Request) -> None: ...
    def prepend(self, request: Request) -> None: ...
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue:
    """First come, first served."""

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

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


POLICIES = {"fcfs": FCFSQueue}


def make_waiting_queue(policy: str) -> WaitingQueue:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {policy!r}; known: {sorted(POLICIES)}") from None
