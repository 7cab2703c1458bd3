"""Knobs of the scheduler, checked once at start."""

from dataclasses import dataclass, field

from scheduler.policy import DEFAULT_AGING_S, POLICIES


@dataclass(slots=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # With chunking on, no prompt takes more than this many tokens of one step (0: no cap),
    # so a long prompt's prefill leaves room for short ones to start beside it.
    long_prefill_token_threshold: int = 0
    policy: str = "fcfs"  # or priority, sjf, fair, slo: see scheduler/policy.py
    # A waiting request gains one priority level per this many seconds (None: no aging).
    priority_aging_s: float | None = DEFAULT_AGING_S
    tenant_weights: dict[str, float] = field(default_factory=dict)  # fair share; 1 where not given
    # No more than this share of the KV blocks per tenant while another tenant's requests wait.
    tenant_kv_fractions: dict[str, float] = field(default_factory=dict)
    # slo policy: a request whose TTFT target cannot be met is refused ("reject", a 429) or
    # runs without its target, after the requests that have one ("best-effort").
    slo_infeasible: str = "reject"
    queue_timeout_s: float | None = None  # a request never scheduled this long after arrival times out
    # A preempted request with at least this many computed tokens is swapped to the host pool
    # (when it fits) instead of being recomputed; None: always recompute.
    swap_threshold_tokens: int | None = None
    batching: str = "continuous"  # or "static" / "dynamic": see scheduler/batching.py
    static_batch_size: int | None = None  # requests per static or dynamic batch; None: max_num_seqs
    batch_timeout_s: float = 0.5  # longest the oldest waiting request waits for its batch to fill

    @property
    def batch_size(self) -> int:
        return self.static_batch_size or self.max_num_seqs

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be at least 0")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step, or the longest ones never run.
            raise ValueError(
                f"with chunked prefill off, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be at least max_model_len ({self.max_model_len})"
            )
        if self.static_batch_size is not None and not 1 <= self.static_batch_size <= self.max_num_seqs:
            # A batch holds a seat per member until all finish, so it must fit the seats.
            raise ValueError(
                f"static_batch_size ({self.static_batch_size}) must be between 1 and max_num_seqs ({self.max_num_seqs})")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.priority_aging_s is not None and self.priority_aging_s <= 0:
            raise ValueError(f"priority_aging_s must be positive or None, got {self.priority_aging_s}")
        if any(weight <= 0 for weight in self.tenant_weights.values()):
            raise ValueError(f"tenant weights must be positive, got {self.tenant_weights}")
        if any(not 0 < fraction <= 1 for fraction in self.tenant_kv_fractions.values()):
            raise ValueError(f"tenant KV fractions must be in (0, 1], got {self.tenant_kv_fractions}")
        if self.slo_infeasible not in ("reject", "best-effort"):
            raise ValueError(f"slo_infeasible must be 'reject' or 'best-effort', got {self.slo_infeasible!r}")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be positive or None, got {self.queue_timeout_s}")
        if self.batch_timeout_s < 0:
            raise ValueError(f"batch_timeout_s must be at least 0, got {self.batch_timeout_s}")
