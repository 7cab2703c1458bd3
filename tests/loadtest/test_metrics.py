"""The numbers of a run from hand-made records: pure logic, milliseconds."""

import pytest

from loadtest.client import RequestRecord, record_timings
from loadtest.metrics import distribution, format_summary, summarize, summarize_by_tenant


def completed(tenant: str, ttft_ms: float, tpot_ms: float | None, tokens: int, prompt_len: int = 10,
              output_len: int | None = None) -> RequestRecord:
    record = RequestRecord(f"{tenant}-{ttft_ms}", tenant, 0, 0.0, prompt_len, output_len or tokens, start_s=0.0,
                           success=True, error=None, prompt_tokens=prompt_len, output_tokens=tokens,
                           ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    record.e2el_ms = ttft_ms + (tpot_ms or 0) * (tokens - 1)
    record.itl_ms = [tpot_ms] * (tokens - 1) if tpot_ms else []
    return record


def failed(tenant: str) -> RequestRecord:
    return RequestRecord(f"{tenant}-failed", tenant, 0, 0.0, 10, 5, error="HTTP 400: too long")


RECORDS = [completed("chat", 100, 10, 5), completed("chat", 300, 30, 3), completed("batch", 50, 5, 9, 20),
           completed("batch", 80, None, 1), failed("batch")]


def test_counts_tokens_and_throughputs():
    result = summarize(RECORDS, duration_s=2.0)
    assert (result["completed"], result["failed"]) == (4, 1)
    assert result["total_input_tokens"] == 10 + 10 + 20 + 10
    assert result["total_output_tokens"] == 5 + 3 + 9 + 1
    assert result["request_throughput"] == pytest.approx(2.0)
    assert result["output_throughput"] == pytest.approx(9.0)
    assert result["total_token_throughput"] == pytest.approx(34.0)
    assert result["goodput"] == result["request_goodput"] == result["request_throughput"]  # no SLO given
    assert result["mean_ttft_ms"] == pytest.approx(132.5)
    assert result["median_ttft_ms"] == pytest.approx(90.0)
    assert result["mean_tpot_ms"] == pytest.approx(15.0)  # the one-token request has no TPOT
    assert result["num_short_outputs"] == 0


def test_goodput_counts_requests_within_every_slo():
    result = summarize(RECORDS, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=8)
    # chat/100 misses TPOT, chat/300 misses TTFT; batch/50 meets both; batch/80 has no TPOT to miss.
    assert result["goodput"] == pytest.approx(1.0)


def test_tenants_add_up_to_the_whole():
    whole = summarize(RECORDS, 2.0, 200, 8)
    tenants = summarize_by_tenant(RECORDS, 2.0, 200, 8)
    assert set(tenants) == {"chat", "batch"}
    for field in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        assert sum(t[field] for t in tenants.values()) == whole[field]
    for field in ("request_throughput", "output_throughput", "goodput"):
        assert sum(t[field] for t in tenants.values()) == pytest.approx(whole[field])
    assert (tenants["batch"]["completed"], tenants["batch"]["failed"]) == (2, 1)


def test_distribution_matches_numpy_conventions():
    stats = distribution("x_ms", [4.0, 1.0, 3.0, 2.0])
    assert stats == pytest.approx({"mean_x_ms": 2.5, "median_x_ms": 2.5, "std_x_ms": 1.118033988749895,
                                   "p90_x_ms": 3.7, "p99_x_ms": 3.97})
    assert distribution("x_ms", []) == {f"{s}_x_ms": None for s in ("mean", "median", "std", "p90", "p99")}


def test_a_run_with_nothing_completed_still_summarizes_and_prints():
    result = summarize([failed("a"), failed("b")], duration_s=0.5)
    result["per_tenant"] = summarize_by_tenant([failed("a"), failed("b")], 0.5)
    result["requests"] = [{"success": False, "error": "HTTP 400: too long"}] * 2
    assert (result["completed"], result["failed"], result["mean_ttft_ms"]) == (0, 2, None)
    text = format_summary(result)
    assert "failed x2: HTTP 400: too long" in text


def test_record_timings_follow_vllm_definitions():
    record = RequestRecord("r", "t", 0, 0.0, 4, 4)
    record_timings(record, sent=10.0, text_times=[10.5, 10.6, 10.8], end=10.9,
                   usage={"prompt_tokens": 4, "completion_tokens": 4})
    assert record.success and record.output_tokens == 4 and record.prompt_tokens == 4
    assert record.ttft_ms == pytest.approx(500)
    assert record.e2el_ms == pytest.approx(900)
    assert record.itl_ms == pytest.approx([100, 200])
    assert record.tpot_ms == pytest.approx(400 / 3)  # (e2e - ttft) / (tokens - 1), tokens from usage
    counted = RequestRecord("r", "t", 0, 0.0, 4, 4)
    record_timings(counted, sent=0.0, text_times=[0.1, 0.2], end=0.2, usage=None)
    assert counted.output_tokens == 2 and counted.prompt_tokens is None
