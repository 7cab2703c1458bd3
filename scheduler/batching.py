"""Batching modes: when waiting requests may be admitted, and the padding the older modes waste.

`continuous` admits and evicts every step (Orca's iteration-level scheduling, as in
vLLM): the Scheduler's own rule, untouched. `static` and `dynamic` model the batching
of servers that run a padded batch to completion (static: a fixed batch of the first N
waiting requests, or fewer after a timeout; dynamic: requests grouped into prompt-length
buckets, as in Triton's dynamic batcher). Both launch a batch, admit only its members
until every one of them has finished, and count the padding a real padded batch would
compute: each prompt padded to the batch's longest, and one token per finished member
per step while the others still run.

The engine computes no padded token: padding is accounting only, while the seats held
and the admission withheld are real, so the latency of these modes is measured, not
simulated. Timeouts read the Scheduler's injected clock.
"""

from itertools import islice
from typing import Protocol

from scheduler.config import SchedulerConfig
from scheduler.policy import WaitingQueue
from scheduler.request import Request


class BatchingPolicy(Protocol):
    padding_tokens: int

    def add(self, request: Request, now: float) -> None: ...
    def forget(self, request: Request) -> None: ...
    def launch(self, waiting: WaitingQueue, now: float) -> None: ...
    def may_admit(self, request: Request) -> bool: ...
    def count_padding(self) -> None: ...
    def seconds_until_launch(self, waiting: WaitingQueue, now: float) -> float: ...


class ContinuousBatching:
    """Any waiting request may take a free seat at any step; nothing is padded."""

    def __init__(self):
        self.padding_tokens = 0

    def add(self, request: Request, now: float) -> None:
        pass

    def forget(self, request: Request) -> None:
        pass

    def launch(self, waiting: WaitingQueue, now: float) -> None:
        pass

    def may_admit(self, request: Request) -> bool:
        return True

    def count_padding(self) -> None:
        pass

    def seconds_until_launch(self, waiting: WaitingQueue, now: float) -> float:
        return 0.0


class RunToCompletionBatching:
    """A launched batch holds the admission until all its members finish; subclasses pick the batch."""

    def __init__(self, batch_size: int, timeout_s: float):
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.padding_tokens = 0
        self.members: list[Request] = []  # the running batch, finished members included
        self._member_set: set[Request] = set()  # by identity: a finished member's id may come back
        self._queued_time: dict[str, float] = {}  # when each request not yet launched was queued

    def add(self, request: Request, now: float) -> None:
        self._queued_time[request.request_id] = now

    def forget(self, request: Request) -> None:
        self._queued_time.pop(request.request_id, None)

    @property
    def in_progress(self) -> bool:
        return any(not member.is_finished for member in self.members)

    def launch(self, waiting: WaitingQueue, now: float) -> None:
        """Start the next batch, if the last one is done and one is due."""
        if self.in_progress or not waiting:
            return
        batch = self.select(waiting, now)
        if not batch:
            return
        self.members = batch
        self._member_set = set(batch)
        longest = max(request.num_prompt_tokens for request in batch)
        self.padding_tokens += sum(longest - request.num_prompt_tokens for request in batch)
        # Members go to the head of the queue, in their order, so admission meets them first.
        for request in reversed(batch):
            waiting.remove(request)
            waiting.prepend(request)
            self._queued_time.pop(request.request_id, None)

    def select(self, waiting: WaitingQueue, now: float) -> list[Request]:
        """The batch to launch now, or [] to keep waiting. Must not change anything."""
        raise NotImplementedError

    def may_admit(self, request: Request) -> bool:
        return request in self._member_set

    def count_padding(self) -> None:
        """A step of the batch runs: every finished member still fills its row with a padding token."""
        self.padding_tokens += sum(1 for member in self.members if member.is_finished)

    def seconds_until_launch(self, waiting: WaitingQueue, now: float) -> float:
        """0 when something can run now, else how long until the oldest waiting request times out."""
        if self.in_progress or not waiting or self.select(waiting, now):
            return 0.0
        return max(0.0, self._oldest(waiting) + self.timeout_s - now)

    def _oldest(self, requests) -> float:
        return min(self._queued_time[request.request_id] for request in requests)

    def _is_due(self, requests, now: float) -> bool:
        return len(requests) >= self.batch_size or now - self._oldest(requests) >= self.timeout_s


class StaticBatching(RunToCompletionBatching):
    """The first N waiting requests, launched once N wait or the oldest has waited the timeout."""

    def select(self, waiting: WaitingQueue, now: float) -> list[Request]:
        if not self._is_due(waiting, now):
            return []
        return list(islice(waiting, self.batch_size))


class DynamicBatching(RunToCompletionBatching):
    """Waiting requests grouped by prompt length into power-of-two buckets; a bucket launches
    once it holds N requests or its oldest has waited the timeout (the oldest due bucket first)."""

    @staticmethod
    def bucket(request: Request) -> int:
        """The smallest power of two at least the prompt length, as its exponent."""
        return (request.num_prompt_tokens - 1).bit_length()

    def select(self, waiting: WaitingQueue, now: float) -> list[Request]:
        buckets: dict[int, list[Request]] = {}
        for request in waiting:
            buckets.setdefault(self.bucket(request), []).append(request)
        due = [requests for requests in buckets.values() if self._is_due(requests, now)]
        if not due:
            return []
        return min(due, key=self._oldest)[:self.batch_size]


def make_batching_policy(config: SchedulerConfig) -> BatchingPolicy:
    if config.batching == "continuous":
        return ContinuousBatching()
    if config.batching == "static":
        return StaticBatching(config.batch_size, config.batch_timeout_s)
    if config.batching == "dynamic":
        return DynamicBatching(config.batch_size, config.batch_timeout_s)
    raise ValueError(f"unknown batching mode {config.batching!r}; known: continuous, dynamic, static")
