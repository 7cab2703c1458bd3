"""Engine settings: model, dtype, device, KV-cache size and the scheduler's knobs."""

from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig

GIB = 1024 ** 3


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # a Hugging Face folder; None serves the embedded SmolLM2
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # the model's dtype; bfloat16 / float16 under float32; fp8_e5m2
    device: str = "auto"
    max_model_len: int | None = None  # defaults to the model's position limit
    block_size: int = 16
    kv_cache_memory: int = 2 * GIB  # bytes for the KV tensor, unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # 2048 with chunked prefill, else max_model_len
    enable_chunked_prefill: bool = True
    # Most tokens of one prompt per step (0: no cap). 256 cut short prompts' p99 TTFT 2.9x
    # behind long ones on mixed-long-short (BENCHMARKS.md, chunked prefill report).
    long_prefill_token_threshold: int = 256
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # or priority, sjf, fair, slo (scheduler/policy.py)
    priority_aging_s: float | None = 60.0  # a waiting request gains a priority level per this long
    tenant_weights: dict[str, float] = field(default_factory=dict)  # for the fair policy
    tenant_kv_fractions: dict[str, float] = field(default_factory=dict)  # per-tenant KV caps while others wait
    slo_infeasible: str = "reject"  # slo policy: refuse unreachable TTFT targets, or run them "best-effort"
    cost_model: str | None = None  # a step cost model saved by `iterserve calibrate`, refined online from there
    queue_timeout_s: float | None = None  # a request still unscheduled this long after arrival times out
    swap_space: int = 0  # bytes of host memory for preempted requests' KV (pinned on CUDA); 0: recompute only
    swap_threshold_tokens: int = 0  # victims with fewer computed tokens are recomputed, not swapped
    batching: str = "continuous"  # "static" or "dynamic": padded batches run to completion (for comparison)
    static_batch_size: int | None = None  # requests per static or dynamic batch; None: max_num_seqs
    batch_timeout_s: float = 0.5  # how long a static or dynamic batch waits to fill
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's choice
    cuda_graphs: bool = False  # capture decode steps as CUDA graphs (CUDA only)
    cuda_graph_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; None: powers of two
    # "auto", "triton", "cpu-kernel" or "torch" (engine/attention.py: ATTENTION_BACKENDS).
    attention_backend: str = "auto"
    # Queue step N+1 while step N runs, reading N's tokens back after (LLMEngine.step); None:
    # on for CUDA, off on CPU, where the model runs as it is called and nothing would overlap.
    async_scheduling: bool | None = None

    def scheduler_config(self, max_model_len: int, swaps: bool) -> SchedulerConfig:
        """The scheduler's knobs, for an engine (or a simulated one) of this context length,
        with or without a host swap pool."""
        return SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or (
                2048 if self.enable_chunked_prefill else max_model_len),
            enable_chunked_prefill=self.enable_chunked_prefill,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            policy=self.policy,
            priority_aging_s=self.priority_aging_s,
            queue_timeout_s=self.queue_timeout_s,
            swap_threshold_tokens=self.swap_threshold_tokens if swaps else None,
            tenant_weights=dict(self.tenant_weights),
            tenant_kv_fractions=dict(self.tenant_kv_fractions),
            slo_infeasible=self.slo_infeasible,
            batching=self.batching,
            static_batch_size=self.static_batch_size,
            batch_timeout_s=self.batch_timeout_s,
        )


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain byte count."""
    units = {"kib": 1024, "mib": 1024 ** 2, "gib": GIB, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)
