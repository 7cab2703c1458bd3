"""A request's state as the scheduler sees it, and the sampling parameters it carries."""

from dataclasses import dataclass, field
import enum
import re


class InvalidRequestError(ValueError):
    """Bad input from a client: raised before the request touches any engine state."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class RequestRejectedError(Exception):
    """The scheduler refuses a valid request at the door (a 429): its SLO cannot be met."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# Below this a temperature is greedy, as in vLLM: dividing logits by 1e-38 overflows
# float32 to inf, and the softmax of infinities is NaN (every token came out as EOS).
MIN_SAMPLING_TEMPERATURE = 1e-5


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    FINISHED_TIMEOUT = "timeout"  # its deadline or the queue timeout passed (the server answers 408)

    # Set on each member below: a plain attribute, where a property reading the name cost 0.2 µs,
    # and the engine asks several times per request and step.
    is_finished: bool

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason` for a finished status."""
        return self.value if self.is_finished else None


for _status in RequestStatus:
    _status.is_finished = _status.name.startswith("FINISHED")


# Every way a request can end, as OpenAI's `finish_reason` (and metrics' label values).
FINISH_REASONS = tuple(status.finish_reason for status in RequestStatus if status.is_finished)


def within_slo(request: "Request") -> bool:
    """Whether a finished request counts toward goodput: it ended normally (stop or length)
    and met its targets (see meets_targets)."""
    if request.status not in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
        return False
    return meets_targets(request.arrival_time, request.first_token_time, request.last_token_time,
                         len(request.output_token_ids), request.slo_ttft_s, request.slo_tpot_s)


def meets_targets(arrival_time: float, first_token_time: float | None, last_token_time: float | None,
                  num_output_tokens: int, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Whether the first token came within the TTFT target and the mean time per output token
    after it within the TPOT target (no targets: a first token is enough). Plain values, so a
    front end that ends a request at a stop string can judge it too."""
    if first_token_time is None:
        return False
    if slo_ttft_s is not None and first_token_time - arrival_time > slo_ttft_s:
        return False
    num_after_first = num_output_tokens - 1
    if slo_tpot_s is not None and num_after_first > 0:
        if (last_token_time - first_token_time) / num_after_first > slo_tpot_s:
            return False
    return True


@dataclass(slots=True)
class StructuredOutput:
    """What a request's output must match, as vLLM's structured outputs take it. The engine
    masks every token that would leave the language (engine/structured_output.py)."""

    kind: str  # one of KINDS
    # json: a JSON schema, as JSON text; regex: a regular expression; choice: a JSON list of
    # the strings allowed; grammar: an EBNF grammar (GBNF's dialect); json_object: nothing.
    spec: str = ""
    # The request field it came from, for a refusal to name (response_format, guided_json, ...).
    param: str = field(default="structured_outputs", compare=False)

    KINDS = ("json", "json_object", "regex", "choice", "grammar")
    MAX_SPEC_CHARS = 256 * 1024
    # A schema's nesting, as JSON: turning it into a grammar (on the engine's thread) grows
    # faster than cubically with it (objects nested 32 deep took 6 ms, 200 deep 0.8 s, 900 deep
    # 77 s). OpenAI allows 10 levels of objects, about 20 here.
    MAX_SCHEMA_DEPTH = 64

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidRequestError(f"{self.param}: the kind must be one of {list(self.KINDS)}, got {self.kind!r}",
                                      param=self.param)
        if not isinstance(self.spec, str) or len(self.spec) > self.MAX_SPEC_CHARS:
            raise InvalidRequestError(f"{self.param} must be text of at most {self.MAX_SPEC_CHARS} characters",
                                      param=self.param)
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequestError(f"{self.param}: a {self.kind} constraint needs its {self.kind}", param=self.param)
        if self.kind == "json" and json_depth(self.spec) > self.MAX_SCHEMA_DEPTH:
            raise InvalidRequestError(f"{self.param}: the schema nests more than {self.MAX_SCHEMA_DEPTH} levels deep",
                                      param=self.param)


def json_depth(text: str) -> int:
    """How many brackets deep the JSON text nests (a scalar: 0), counted outside its strings,
    so text too deep for the json module to read is measured too."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) keeps every token
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many top alternatives to return with each token
    # The same for each prompt token after the first (vLLM's prompt_logprobs): what scoring a
    # text needs. Such a request reads nothing from the prefix cache, since a cached block's
    # tokens are never run through the model again.
    prompt_logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # OpenAI's logit_bias: added to these tokens' logits before penalties and sampling.
    logit_bias: dict[int, float] | None = None
    # The output must match this (JSON, a schema, a regex, a choice, a grammar): tokens that
    # cannot continue it are masked before sampling, and completing it ends the request.
    structured_output: StructuredOutput | None = None

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be between 0 and 100"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be -1, 0 or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be between -2 and 2"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "must be in (0, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
             f"must be between 0 and {self.MAX_LOGPROBS}"),
            ("prompt_logprobs", self.prompt_logprobs is None or (
                isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS),
             f"must be between 0 and {self.MAX_LOGPROBS}"),
            # Guarded so a max_tokens that is not an int is reported as such, not as a TypeError here.
            ("min_tokens", isinstance(self.max_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "must be between 0 and max_tokens"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("logit_bias", self.logit_bias is None or all(
                isinstance(token, int) and token >= 0 and isinstance(bias, (int, float))
                and -self.MAX_LOGIT_BIAS <= bias <= self.MAX_LOGIT_BIAS for token, bias in self.logit_bias.items()),
             f"must map token ids to biases between -{self.MAX_LOGIT_BIAS:g} and {self.MAX_LOGIT_BIAS:g}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"{param} {message}, got {getattr(self, param)!r}", param=param)
        if self.structured_output is not None:
            self.structured_output.validate()


# Not frozen, though never changed (a change is a `replace`): a frozen dataclass sets each field
# through object.__setattr__, 1.0 against 0.2 µs for these nine, and one is made per request and
# step in the engine, and again in the front end as it arrives.
@dataclass(slots=True)
class RequestTimes:
    """What metrics need of a request, copied when an output is made: plain values that can
    cross to another thread or process while the request itself goes on changing."""

    tenant: str
    arrival_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None
    within_slo: bool  # see within_slo; False until it finishes


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0
    tenant: str = ""
    cache_salt: str = ""  # see kvcache.hashing.root_hash
    deadline: float | None = None  # on the scheduler's clock: unfinished by then, it ends as a timeout
    slo_ttft_s: float | None = None  # targets for the slo policy: time to first token,
    slo_tpot_s: float | None = None  # and time per output token after it
    best_effort: bool = False  # its TTFT target was out of reach at the door: it runs after those with targets
    held: bool = False  # not admitted until the engine lets go (its structured output's grammar is compiling)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # The one counter chunked prefill, prefix hits, recompute and decode all advance.
    num_computed_tokens: int = 0
    # Sampled by a step still in flight, not yet known (async scheduling): counted in the
    # tokens to compute, since the next step computes it, but not yet in all_token_ids.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    _all_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._all_token_ids = list(self.prompt_token_ids)
        self._all_token_ids.extend(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether cached blocks may stand in for computing its prompt (not when it wants the
        prompt's logprobs: those come only from running every prompt token)."""
        return self.sampling_params.prompt_logprobs is None

    def times(self) -> RequestTimes:
        return RequestTimes(self.tenant, self.arrival_time, len(self.prompt_token_ids), len(self.output_token_ids),
                            self.first_scheduled_time, self.first_token_time, self.last_token_time,
                            self.finished_time, self.is_finished and within_slo(self))

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def extend_output_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
