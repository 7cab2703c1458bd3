"""`iterserve bench` against a live tiny server: fields, counts and files; never timings."""

import json

import pytest

from server.cli import main

pytestmark = pytest.mark.slow

TENANT_FIELDS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "goodput", "output_throughput", "total_token_throughput", "num_short_outputs",
] + [f"{statistic}_{latency}_ms" for latency in ("ttft", "tpot", "itl", "e2el")
     for statistic in ("mean", "median", "std", "p90", "p99")]
RUN_FIELDS = [
    "date", "label", "base_url", "endpoint", "model_id", "tokenizer_id", "trace", "dataset", "num_prompts",
    "request_rate", "burstiness", "max_concurrency", "seed", "deadline_s", "slo_ttft_ms", "slo_tpot_ms",
    "per_tenant", "requests",
] + TENANT_FIELDS
RECORD_FIELDS = ["id", "tenant", "priority", "arrival_s", "prompt_len", "output_len", "start_s", "success",
                 "error", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms", "itl_ms"]


def bench(server, *arguments) -> int:
    return main(["bench", "--base-url", server.url, "--no-progress", *arguments])


def check_counts(result: dict) -> None:
    assert sorted(result) == sorted(RUN_FIELDS)
    assert len(result["requests"]) == result["num_prompts"] == result["completed"] + result["failed"]
    assert all(sorted(record) == sorted(RECORD_FIELDS) for record in result["requests"])
    assert result["completed"] == sum(record["success"] for record in result["requests"])
    for tenant in result["per_tenant"].values():
        assert sorted(tenant) == sorted(TENANT_FIELDS)
    for field in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        assert sum(tenant[field] for tenant in result["per_tenant"].values()) == result[field]
    for field in ("request_throughput", "output_throughput", "goodput"):
        assert sum(tenant[field] for tenant in result["per_tenant"].values()) == pytest.approx(result[field])


def test_a_generated_run_asks_exact_lengths_and_writes_json_and_plot(bench_server, tmp_path, capsys):
    out = tmp_path / "random.json"
    assert bench(bench_server, "--dataset", "random", "--num-prompts", "6", "--input-len", "24", "--output-len",
                 "8", "--range-ratio", "0.5", "--request-rate", "50", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    check_counts(result)
    assert (result["completed"], result["failed"], result["model_id"]) == (6, 0, "tiny")
    assert list(result["per_tenant"]) == ["default"]
    for record in result["requests"]:  # the server's usage agrees with what was asked
        assert (record["prompt_tokens"], record["output_tokens"]) == (record["prompt_len"], record["output_len"])
        assert len(record["itl_ms"]) <= record["output_tokens"] - 1
    assert result["total_output_tokens"] == sum(record["output_len"] for record in result["requests"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_a_trace_with_tenants_and_a_failure_adds_up(bench_server, tmp_path, tiny_model_path):
    trace = tmp_path / "trace.jsonl"
    rows = [("c1", 0.0, 20, 6, "chat", 0), ("b1", 0.02, 40, 4, "batch", 1), ("c2", 0.05, 12, 5, "chat", 0),
            ("b2", 0.05, 600, 4, "batch", 1), ("c3", 0.1, 3, 1, "chat", 0)]  # b2 is longer than the context
    trace.write_text("".join(json.dumps(dict(zip(["id", "arrival_s", "prompt_len", "output_len", "tenant",
                                                  "priority"], row))) + "\n" for row in rows))
    out = tmp_path / "trace.json"
    assert bench(bench_server, "--trace", str(trace), "--tokenizer", str(tiny_model_path), "--max-concurrency",
                 "2", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    check_counts(result)
    assert (result["completed"], result["failed"], result["request_rate"]) == (4, 1, "trace")
    assert sorted(result["per_tenant"]) == ["batch", "chat"]
    assert (result["per_tenant"]["batch"]["completed"], result["per_tenant"]["batch"]["failed"]) == (1, 1)
    failure = next(record for record in result["requests"] if not record["success"])
    assert failure["id"] == "b2" and failure["error"].startswith("HTTP 400")
    assert out.with_suffix(".png").exists()


def test_a_sweep_and_a_side_by_side_plot(bench_server, tmp_path):
    sweep = tmp_path / "sweep.json"
    assert bench(bench_server, "--num-prompts", "3", "--input-len", "16", "--output-len", "4",
                 "--sweep-rates", "20,40", "--label", "tiny", "--out", str(sweep)) == 0
    data = json.loads(sweep.read_text())
    assert data["request_rates"] == [20.0, 40.0] and data["label"] == "tiny"
    for result in data["runs"]:
        check_counts(result)
    assert sweep.with_suffix(".png").exists()
    figure = tmp_path / "side-by-side.png"
    assert main(["bench", "plot", str(sweep), str(sweep), "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
    single = tmp_path / "single.json"
    single.write_text(json.dumps(data["runs"][0]))
    cdfs = tmp_path / "cdfs.png"
    assert main(["bench", "plot", str(single), str(single), "--labels", "a,b", "--out", str(cdfs)]) == 0
    assert cdfs.stat().st_size > 0


def test_the_deadline_ends_the_run_and_every_request_is_counted(bench_server, tmp_path):
    out = tmp_path / "deadline.json"
    assert bench(bench_server, "--num-prompts", "4", "--input-len", "16", "--output-len", "400",
                 "--request-rate", "8", "--deadline-s", "0.3", "--no-plot", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    check_counts(result)
    errors = {record["error"] for record in result["requests"] if not record["success"]}
    assert errors <= {"cancelled at the deadline", "not sent before the deadline"}

