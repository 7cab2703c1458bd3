"""What the engine reports: each iteration's news for a request (`RequestOutput`), and a
request's whole answer summed from them (`Completion`, the offline API's)."""

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs
from scheduler.request import RequestTimes


@dataclass(slots=True)
class RequestOutput:
    """What one iteration did for one request: only what is new, plus plain copies of its
    times. Small and picklable, so it can cross to another thread or process (issue 10)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    times: RequestTimes
    finish_reason: str | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    # With the request's first token, if it asked for them: an entry per prompt token, None
    # for the first (nothing comes before it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True)
class Completion:
    """A request's output summed over its RequestOutputs (the offline API's answer)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.token_ids.extend(output.new_token_ids)
        self.text += output.new_text
        self.logprobs.extend(output.new_logprobs)
        self.num_cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finished, self.finish_reason, self.error = True, output.finish_reason, output.error
