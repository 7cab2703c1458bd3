"""What one step's plan holds: who runs with how many tokens, and the KV copies to make first."""

from dataclasses import dataclass, field

from scheduler.cost_model import StepShape
from scheduler.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    # Both read off the request when it is scheduled: under async scheduling it moves on
    # (`Scheduler.advance`) before this step has run.
    start_position: int = field(init=False)
    samples: bool = field(init=False)  # the step reaches the request's last token, so a new one is sampled

    def __post_init__(self):
        request = self.request
        self.start_position = request.num_computed_tokens
        self.samples = self.start_position + self.num_new_tokens == request.num_tokens + request.num_pending_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    timed_out: list[Request] = field(default_factory=list)  # ended before this step: report them
    # KV copies the engine makes before the step runs, every one reading its source before any
    # writes (the two may trade blocks within a step): (device block, host block) for requests
    # swapped out, (host block, device block) for those swapped back in.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def shape(self) -> StepShape:
        """The step's work for the cost model (call before `Scheduler.update` advances it)."""
        prefill = decodes = context = 0
        for s in self.scheduled:
            request = s.request
            if s.num_new_tokens == 1 and request.num_computed_tokens >= request.num_prompt_tokens:
                decodes += 1
            else:
                prefill += s.num_new_tokens
            context += request.num_computed_tokens + s.num_new_tokens
        return StepShape(prefill, decodes, context)
