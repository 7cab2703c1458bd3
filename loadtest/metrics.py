"""Turns request records into a run's numbers, under vLLM benchmark_serving's field names.

Throughputs divide by the whole run's duration, for a tenant too, so the tenants'
throughputs add up to the run's. Goodput counts completed requests that meet every
SLO given (a request of one output token has no TPOT and so cannot miss that SLO);
with no SLO it equals the request throughput.
"""

from collections import Counter
import math

from loadtest.client import RequestRecord

LATENCIES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st token)",
             "itl": "Inter-token latency", "e2el": "End-to-end latency"}
STATISTICS = ("mean", "median", "std", "p90", "p99")


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    completed = [record for record in records if record.success]
    total_input_tokens = sum(input_tokens(record) for record in completed)
    total_output_tokens = sum(record.output_tokens for record in completed)
    num_good = sum(meets_slo(record, slo_ttft_ms, slo_tpot_ms) for record in completed)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    result = {
        "duration": duration_s,
        "completed": len(completed),
        "failed": len(records) - len(completed),
        "total_input_tokens": total_input_tokens,
        "total_output_tokens": total_output_tokens,
        "request_throughput": len(completed) * per_second,
        "request_goodput": num_good * per_second,  # vLLM's name
        "goodput": num_good * per_second,  # the name, same number
        "output_throughput": total_output_tokens * per_second,
        "total_token_throughput": (total_input_tokens + total_output_tokens) * per_second,
        "num_short_outputs": sum(record.output_tokens < record.output_len for record in completed),
    }
    values = {
        "ttft": [record.ttft_ms for record in completed],
        "tpot": [record.tpot_ms for record in completed if record.tpot_ms is not None],
        "itl": [itl for record in completed for itl in record.itl_ms],
        "e2el": [record.e2el_ms for record in completed],
    }
    for latency in LATENCIES:
        result.update(distribution(f"{latency}_ms", values[latency]))
    return result


def report(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
           slo_tpot_ms: float | None = None) -> dict:
    """A run's numbers, its tenants' (`per_tenant`) and every request's record (`requests`)."""
    return summarize(records, duration_s, slo_ttft_ms, slo_tpot_ms) | {
        "per_tenant": summarize_by_tenant(records, duration_s, slo_ttft_ms, slo_tpot_ms),
        # Not dataclasses.asdict: its deep copies took a tenth of a 10,000-request simulation.
        "requests": [{name: getattr(record, name) for name in RequestRecord.__slots__} for record in records],
    }


def summarize_by_tenant(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
                        slo_tpot_ms: float | None = None) -> dict[str, dict]:
    tenants = sorted({record.tenant for record in records})
    return {tenant: summarize([r for r in records if r.tenant == tenant], duration_s, slo_ttft_ms, slo_tpot_ms)
            for tenant in tenants}


def input_tokens(record: RequestRecord) -> int:
    return record.prompt_tokens if record.prompt_tokens is not None else record.prompt_len


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and record.ttft_ms > slo_ttft_ms:
        return False
    return slo_tpot_ms is None or record.tpot_ms is None or record.tpot_ms <= slo_tpot_ms


def distribution(name: str, values: list[float]) -> dict[str, float | None]:
    """mean, median, std (population, as numpy's default), p90, p99; None for no values."""
    if not values:
        return {f"{statistic}_{name}": None for statistic in STATISTICS}
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered)
    return {
        f"mean_{name}": mean,
        f"median_{name}": percentile(ordered, 50),
        f"std_{name}": math.sqrt(sum((value - mean) ** 2 for value in ordered) / len(ordered)),
        f"p90_{name}": percentile(ordered, 90),
        f"p99_{name}": percentile(ordered, 99),
    }


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, numpy.percentile's default."""
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def format_summary(result: dict) -> str:
    """A table in the shape of vLLM's benchmark printout, then one line per tenant."""
    rows = [("Successful requests:", result["completed"]), ("Failed requests:", result["failed"]),
            ("Benchmark duration (s):", result["duration"]),
            ("Total input tokens:", result["total_input_tokens"]),
            ("Total generated tokens:", result["total_output_tokens"]),
            ("Request throughput (req/s):", result["request_throughput"]),
            ("Request goodput (req/s):", result["goodput"]),
            ("Output token throughput (tok/s):", result["output_throughput"]),
            ("Total token throughput (tok/s):", result["total_token_throughput"])]
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{label:<44}{_number(value):>16}" for label, value in rows]
    for latency, title in LATENCIES.items():
        lines.append("{:-^60}".format(f" {title} "))
        for statistic in ("mean", "median", "p90", "p99"):
            label = f"{statistic.capitalize()} {latency.upper()} (ms):"
            lines.append(f"{label:<44}{_number(result[f'{statistic}_{latency}_ms']):>16}")
    if len(result.get("per_tenant", {})) > 1:
        lines.append("{:-^60}".format(" Per tenant "))
        lines.append(f"{'tenant':<12}{'done':>6}{'fail':>6}{'out tok/s':>11}{'p99 TTFT':>11}{'p99 TPOT':>11}"
                     f"{'goodput':>9}")
        for tenant, numbers in result["per_tenant"].items():
            lines.append(f"{tenant[:12]:<12}{numbers['completed']:>6}{numbers['failed']:>6}"
                         f"{_number(numbers['output_throughput']):>11}{_number(numbers['p99_ttft_ms']):>11}"
                         f"{_number(numbers['p99_tpot_ms']):>11}{_number(numbers['goodput']):>9}")
    lines.append("=" * 60)
    errors = Counter(r["error"] for r in result.get("requests", []) if not r["success"])
    for error, count in errors.most_common(3):
        lines.append(f"failed x{count}: {error}")
    if result.get("num_short_outputs"):
        lines.append(f"warning: {result['num_short_outputs']} completed requests returned fewer tokens than "
                     "asked (does the server honour ignore_eos?)")
    return "\n".join(lines)


def _number(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"
