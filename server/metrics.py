"""Prometheus metrics, observed on the engine thread from the timestamps each request carries.

Every value is derived from a `Request`'s own clock readings (arrival, first
scheduled, first token, each token, finish) and from the scheduler's and KV
cache's counters, never from a side channel. Every series carries `model_name`.
With `compat="vllm"` each value is exported a second time under vLLM's name
(`vllm:time_to_first_token_seconds`, ...), so dashboards and routers built for
vLLM read iterserve unchanged.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine import RequestOutput
from scheduler.request import FINISH_REASONS
from scheduler.stats import SchedulerStats
from server.tenant_metrics import REJECTION_REASONS, TenantMetrics

COST_TERMS = ("base", "prefill_token", "decode_seq", "context_token")  # scheduler.cost_model.Coefficients

# A millisecond to ten minutes: decode steps on a fast GPU up to long CPU prompts.
TIME_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 240.0, 480.0, 600.0,
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    key: str
    kind: type
    name: str  # after "iterserve_"
    vllm_names: tuple[str, ...]  # after "vllm:"
    documentation: str
    by_finish_reason: bool = False


SPECS = (
    MetricSpec("ttft", Histogram, "time_to_first_token_seconds", ("time_to_first_token_seconds",),
               "Time from arrival to the first output token."),
    MetricSpec("itl", Histogram, "inter_token_latency_seconds",
               ("inter_token_latency_seconds", "time_per_output_token_seconds"),
               "Time between consecutive output tokens of a request (TPOT)."),
    MetricSpec("e2e", Histogram, "e2e_request_latency_seconds", ("e2e_request_latency_seconds",),
               "Time from arrival to finish."),
    MetricSpec("queue", Histogram, "request_queue_time_seconds", ("request_queue_time_seconds",),
               "Time from arrival to first being scheduled."),
    MetricSpec("prefill", Histogram, "request_prefill_time_seconds", ("request_prefill_time_seconds",),
               "Time from first being scheduled to the first token."),
    MetricSpec("decode", Histogram, "request_decode_time_seconds", ("request_decode_time_seconds",),
               "Time from the first token to the last."),
    MetricSpec("prompt_length", Histogram, "request_prompt_tokens", ("request_prompt_tokens",),
               "Prompt length of finished requests, in tokens."),
    MetricSpec("generation_length", Histogram, "request_generation_tokens", ("request_generation_tokens",),
               "Output length of finished requests, in tokens."),
    MetricSpec("waiting", Gauge, "num_requests_waiting", ("num_requests_waiting",),
               "Requests in the waiting queue (new and preempted)."),
    MetricSpec("running", Gauge, "num_requests_running", ("num_requests_running",),
               "Requests holding a seat in the running batch."),
    MetricSpec("kv_usage", Gauge, "kv_cache_usage_perc", ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
               "Share of KV blocks in use; 1 means all of them."),
    MetricSpec("prompt_tokens", Counter, "prompt_tokens", ("prompt_tokens",),
               "Prompt tokens of requests that produced a first token."),
    MetricSpec("generation_tokens", Counter, "generation_tokens", ("generation_tokens",),
               "Output tokens generated."),
    MetricSpec("preemptions", Counter, "num_preemptions", ("num_preemptions",),
               "Requests preempted to free KV blocks (recomputed later)."),
    MetricSpec("prefix_queries", Counter, "prefix_cache_queries", ("prefix_cache_queries",),
               "Prompt tokens looked up in the prefix cache."),
    MetricSpec("prefix_hits", Counter, "prefix_cache_hits", ("prefix_cache_hits",),
               "Prompt tokens found in the prefix cache."),
    MetricSpec("padding_tokens", Counter, "padding_tokens", (),  # vLLM never pads, so has no such series
               "Padding a static or dynamic batch computes for nothing (prompts to the longest, finished rows)."),
    MetricSpec("finished", Counter, "requests_finished", ("request_success",),
               "Finished requests by finish reason.", by_finish_reason=True),
)


def length_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (as vLLM does)."""
    buckets, magnitude = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * magnitude
            if value > max_model_len:
                return buckets
            buckets.append(value)
        magnitude *= 10


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int, kv_bytes_per_block: int, compat: str | None = None,
                 tenant_names: list[str] | None = None,
                 tenant_slos: dict[str, tuple[float | None, float | None]] | None = None,
                 engine_pid: int | None = None, cache_config: dict[str, str] | None = None):
        self.kv_bytes_per_block = kv_bytes_per_block  # for the swapped-bytes counters
        self.registry = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes, CPU seconds, open fds: what a soak watches (vLLM exports them too).
        ProcessCollector(registry=self.registry)
        if engine_pid is not None:
            # The engine process holds the weights and the KV cache: its memory is most of the server's.
            ProcessCollector(namespace="iterserve_engine", pid=lambda: engine_pid, registry=self.registry)
        self._children: dict[str, list] = {}
        namespaces = [("iterserve_", "finish_reason", lambda spec: (spec.name,))]
        if compat == "vllm":
            namespaces.append(("vllm:", "finished_reason", lambda spec: spec.vllm_names))
        elif compat is not None:
            raise ValueError(f"unknown metrics compatibility {compat!r}; known: vllm")
        for spec in SPECS:
            children = []
            for prefix, reason_label, names in namespaces:
                for name in names(spec):
                    children.append(self._family(spec, prefix + name, reason_label, model_name, max_model_len))
            self._children[spec.key] = children
        if cache_config:
            # vLLM's cache_config_info: the KV cache's settings as labels of a constant 1, for a
            # dashboard that sizes capacity (blocks x block size) and shows which cache dtype runs.
            for prefix, _, _ in namespaces:
                Gauge(prefix + "cache_config_info", "The KV cache's configuration, as labels.",
                      ["model_name", *cache_config], registry=self.registry).labels(
                          model_name, *cache_config.values()).set(1)
        self._last_token_time: dict[str, float] = {}  # engine thread only
        self._seen: dict[str, int] = {}  # the engine's running totals, as of the last step
        by_mode = Counter("iterserve_preemptions_by_mode", "Preemptions, by how the victim's KV was handled.",
                          ["model_name", "mode"], registry=self.registry)
        self._preemptions_by_mode = {mode: by_mode.labels(model_name, mode) for mode in ("recompute", "swap")}
        swapped = Counter("iterserve_kv_swapped_bytes", "KV bytes copied to the host swap pool (out) and back (in).",
                          ["model_name", "direction"], registry=self.registry)
        self._swapped_bytes = {direction: swapped.labels(model_name, direction) for direction in ("out", "in")}
        rejected = Counter("iterserve_requests_rejected", "Sequences refused at the door (429), by reason: "
                           "queue_full, tenant_queue_full, rate_limit_exceeded, slo_unreachable.",
                           ["model_name", "reason"], registry=self.registry)
        self._rejected = {reason: rejected.labels(model_name, reason) for reason in REJECTION_REASONS}
        self._within_slo = Counter("iterserve_requests_within_slo", "Requests that finished (stop or length) "
                                   "within their TTFT and TPOT targets, if they had any: goodput.",
                                   ["model_name"], registry=self.registry).labels(model_name)
        self._token_budget = Gauge("iterserve_step_token_budget", "The last step's token budget (the slo policy "
                                   "sizes it to the TPOT targets).", ["model_name"],
                                   registry=self.registry).labels(model_name)
        cost = Gauge("iterserve_cost_model_seconds", "The step cost model's coefficients: seconds per step (base), "
                     "per prompt token, per decode sequence and per context token read.", ["model_name", "term"],
                     registry=self.registry)
        self._cost_terms = {term: cost.labels(model_name, term) for term in COST_TERMS}
        self._cost_error = Gauge("iterserve_cost_model_relative_error", "Mean relative error of the cost model's "
                                 "step-time predictions (recent steps weigh more).", ["model_name"],
                                 registry=self.registry).labels(model_name)
        self.tenants = (TenantMetrics(self.registry, model_name, tenant_names, TIME_BUCKETS_S, tenant_slos or {})
                        if tenant_names else None)

    def _family(self, spec: MetricSpec, name: str, reason_label: str, model_name: str, max_model_len: int):
        labels = ["model_name"] + ([reason_label] if spec.by_finish_reason else [])
        extra = {}
        if spec.kind is Histogram:
            extra["buckets"] = TIME_BUCKETS_S if name.endswith("_seconds") else length_buckets(max_model_len)
        family = spec.kind(name, spec.documentation, labels, registry=self.registry, **extra)
        if spec.by_finish_reason:
            # Every reason is exported from the start, so rate() sees the first one.
            return {reason: family.labels(model_name, reason) for reason in FINISH_REASONS}
        return family.labels(model_name)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- observations (engine thread) ---------------------------------------------------

    def _observe(self, key: str, value: float) -> None:
        for child in self._children[key]:
            child.observe(value)

    def _inc(self, key: str, amount: float = 1.0) -> None:
        if amount:
            for child in self._children[key]:
                child.inc(amount)

    def _set(self, key: str, value: float) -> None:
        for child in self._children[key]:
            child.set(value)

    def record_step(self, outputs: list[RequestOutput], stats: SchedulerStats) -> None:
        """Called by the engine loop after every iteration, with that iteration's outputs and
        the scheduler's state after it."""
        for output in outputs:
            self._record_output(output)
        self._set("waiting", stats.num_waiting)
        self._set("running", stats.num_running)
        self._set("kv_usage", stats.kv_cache.usage)
        self._inc_to("preemptions", stats.num_preemptions)
        self._inc_to("prefix_queries", stats.kv_cache.prefix_cache_queries)
        self._inc_to("prefix_hits", stats.kv_cache.prefix_cache_hits)
        self._inc_to("padding_tokens", stats.padding_tokens)
        self._record_swaps(stats)
        self._token_budget.set(stats.token_budget)
        for term, child in self._cost_terms.items():
            child.set(getattr(stats.cost_coefficients, f"{term}_s"))
        self._cost_error.set(stats.cost_mean_relative_error)
        if self.tenants is not None:
            self.tenants.record_step(stats)

    def record_rejection(self, tenant: str, reason: str, num_sequences: int) -> None:
        """A refusal at the door (any thread: prometheus_client's counters are thread-safe)."""
        child = self._rejected.get(reason)
        if child is not None:
            child.inc(num_sequences)
        if self.tenants is not None:
            self.tenants.record_rejection(tenant, reason, num_sequences)

    def _record_swaps(self, stats: SchedulerStats) -> None:
        for mode, total in stats.num_preemptions_by_mode.items():
            self._preemptions_by_mode[mode].inc(self._new_since_last_step(f"preempted by {mode}", total))
        for direction, num_blocks in stats.num_blocks_swapped.items():
            num_new = self._new_since_last_step(f"blocks swapped {direction}", num_blocks)
            self._swapped_bytes[direction].inc(num_new * self.kv_bytes_per_block)

    def _inc_to(self, key: str, total: int) -> None:
        self._inc(key, self._new_since_last_step(key, total))

    def _new_since_last_step(self, key: str, total: int) -> int:
        """Counters the engine keeps as running totals: what is new since last time."""
        new = total - self._seen.get(key, 0)
        self._seen[key] = total
        return new

    def _record_output(self, output: RequestOutput) -> None:
        times = output.times
        if output.new_token_ids:
            previous = self._last_token_time.get(output.request_id)
            if previous is None:
                self._observe("ttft", times.first_token_time - times.arrival_time)
                self._inc("prompt_tokens", times.num_prompt_tokens)
            else:
                # One observation per token after the first: the engine emits a token per step.
                self._observe("itl", times.last_token_time - previous)
            self._last_token_time[output.request_id] = times.last_token_time
            self._inc("generation_tokens", len(output.new_token_ids))
            if self.tenants is not None:
                self.tenants.record_token(times, previous is None, previous, len(output.new_token_ids))
        if output.finished:
            self._record_finished(output)

    def _record_finished(self, output: RequestOutput) -> None:
        times = output.times
        self._last_token_time.pop(output.request_id, None)
        for child in self._children["finished"]:
            child[output.finish_reason or "error"].inc()
        finished = times.finished_time if times.finished_time is not None else times.last_token_time
        self._observe("e2e", finished - times.arrival_time)
        if times.within_slo:
            self._within_slo.inc()
        if self.tenants is not None:
            self.tenants.record_finished(output, finished)
        self._observe("prompt_length", times.num_prompt_tokens)
        self._observe("generation_length", times.num_output_tokens)
        if times.first_scheduled_time is not None:
            self._observe("queue", times.first_scheduled_time - times.arrival_time)
            if times.first_token_time is not None:
                self._observe("prefill", times.first_token_time - times.first_scheduled_time)
                self._observe("decode", times.last_token_time - times.first_token_time)
