"""Per-tenant series, exported only when a tenants file names tenants (`--tenants`).

The label values are the configured tenant names and `default`, never a client's
string (scheduler/tenants.py resolves every request to one of those), so a client
cannot grow the number of series. Observed on the engine thread, from the same
request timestamps as server/metrics.py.
"""

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine import RequestOutput
from scheduler.request import FINISH_REASONS, RequestTimes
from scheduler.stats import SchedulerStats

# The codes of the 429s the door gives (server/async_engine.py), as label values.
REJECTION_REASONS = ("queue_full", "tenant_queue_full", "rate_limit_exceeded", "slo_unreachable")


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, tenant_names: list[str],
                 time_buckets_s: tuple[float, ...], slos: dict[str, tuple[float | None, float | None]]):
        self.tenant_names = list(tenant_names)
        labels = ("model_name", "tenant")

        def histogram(name: str, documentation: str) -> dict:
            family = Histogram(f"iterserve_tenant_{name}", documentation, labels, registry=registry,
                               buckets=time_buckets_s)
            return {tenant: family.labels(model_name, tenant) for tenant in self.tenant_names}

        def per_tenant(kind, name: str, documentation: str) -> dict:
            family = kind(f"iterserve_tenant_{name}", documentation, labels, registry=registry)
            return {tenant: family.labels(model_name, tenant) for tenant in self.tenant_names}

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first output token, by tenant.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens, by tenant.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to finish, by tenant.")
        self.prompt_tokens = per_tenant(Counter, "prompt_tokens", "Prompt tokens of requests that got a first token.")
        self.generation_tokens = per_tenant(Counter, "generation_tokens", "Output tokens generated, by tenant.")
        self.waiting = per_tenant(Gauge, "num_requests_waiting", "Requests waiting for a seat, by tenant.")
        self.running = per_tenant(Gauge, "num_requests_running", "Requests holding a seat, by tenant.")
        self.kv_blocks = per_tenant(Gauge, "kv_cache_blocks", "KV blocks held by the tenant's requests.")
        finished = Counter("iterserve_tenant_requests_finished", "Finished requests by tenant and finish reason.",
                           labels + ("finish_reason",), registry=registry)
        self.finished = {(tenant, reason): finished.labels(model_name, tenant, reason)
                         for tenant in self.tenant_names for reason in FINISH_REASONS}
        self.within_slo = per_tenant(Counter, "requests_within_slo", "Requests that finished within their TTFT "
                                     "and TPOT targets (goodput), by tenant.")
        rejected = Counter("iterserve_tenant_requests_rejected", "Sequences refused at the door (429), by tenant "
                           "and reason.", labels + ("reason",), registry=registry)
        self.rejected = {(tenant, reason): rejected.labels(model_name, tenant, reason)
                         for tenant in self.tenant_names for reason in REJECTION_REASONS}
        # The targets, so a dashboard can draw them beside the percentiles (absent: no target).
        ttft_target = Gauge("iterserve_tenant_slo_ttft_seconds", "The tenant's TTFT target.", labels,
                            registry=registry)
        tpot_target = Gauge("iterserve_tenant_slo_tpot_seconds", "The tenant's TPOT target.", labels,
                            registry=registry)
        for tenant, (ttft_s, tpot_s) in slos.items():
            if tenant in self.ttft and ttft_s is not None:
                ttft_target.labels(model_name, tenant).set(ttft_s)
            if tenant in self.ttft and tpot_s is not None:
                tpot_target.labels(model_name, tenant).set(tpot_s)

    def record_step(self, stats: SchedulerStats) -> None:
        """From a snapshot taken with its per-tenant counts (scheduler.stats.snapshot(by_tenant=True))."""
        waiting, running, blocks = Tally(), Tally(), Tally()
        for folded, counts in ((waiting, stats.waiting_by_tenant), (running, stats.running_by_tenant),
                               (blocks, stats.kv_blocks_by_tenant)):
            for tenant, count in counts.items():
                folded[self._fold(tenant)] += count
        for tenant in self.tenant_names:
            self.waiting[tenant].set(waiting[tenant])
            self.running[tenant].set(running[tenant])
            self.kv_blocks[tenant].set(blocks[tenant])

    def record_token(self, times: RequestTimes, first: bool, previous_token_time: float | None,
                     num_new_tokens: int) -> None:
        tenant = self._fold(times.tenant)
        if first:
            self.ttft[tenant].observe(times.first_token_time - times.arrival_time)
            self.prompt_tokens[tenant].inc(times.num_prompt_tokens)
        elif previous_token_time is not None:
            self.itl[tenant].observe(times.last_token_time - previous_token_time)
        self.generation_tokens[tenant].inc(num_new_tokens)

    def record_finished(self, output: RequestOutput, finished_time: float) -> None:
        tenant = self._fold(output.times.tenant)
        self.finished[(tenant, output.finish_reason or "error")].inc()
        self.e2e[tenant].observe(finished_time - output.times.arrival_time)
        if output.times.within_slo:
            self.within_slo[tenant].inc()

    def record_rejection(self, tenant: str, reason: str, num_sequences: int) -> None:
        child = self.rejected.get((tenant if tenant in self.ttft else "default", reason))
        if child is not None:
            child.inc(num_sequences)

    def _fold(self, tenant: str) -> str:
        # Requests reach the engine with a configured name or "default"; anything else is ours to fold.
        return tenant if tenant in self.ttft else "default"
