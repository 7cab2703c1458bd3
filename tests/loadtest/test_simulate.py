"""`iterserve simulate` and `iterserve calibrate` end to end: a calibration of the tiny model,
a simulation with it that writes bench's JSON (per tenant too) and plot, a rate sweep that
finds the capacity and the replicas for a target, and one-line errors for bad commands."""

import json
from pathlib import Path

import pytest

from server.cli import main



def write_trace(path: Path) -> Path:
    rows = [{"id": f"r{i}", "arrival_s": i * 0.1, "prompt_len": 30 + i % 50, "output_len": 5 + i % 20,
             "tenant": "chat" if i % 2 else "batch"} for i in range(60)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_calibrate_then_simulate_with_the_calibration(tiny_model_path, tmp_path):
    cost = tmp_path / "cost.json"
    assert main(["calibrate", "--model", str(tiny_model_path), "--out", str(cost), "--batch-sizes", "1,4",
                 "--prompt-lens", "16,64", "--output-len", "4", "--num-kv-blocks", "64"]) == 0
    saved = json.loads(cost.read_text())
    assert saved["num_observed"] > 8 and saved["kv_bytes_per_block"] > 0 and saved["block_size"] == 16
    assert all(value >= 0 for value in saved["coefficients"].values()) and saved["coefficients"]["base_s"] > 0

    out = tmp_path / "sim.json"
    assert main(["simulate", "--cost-model", str(cost), "--trace", str(write_trace(tmp_path / "t.jsonl")),
                 "--slo-ttft-ms", "1000", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 60 and result["failed"] == 0
    assert set(result["per_tenant"]) == {"chat", "batch"}
    assert result["simulated"]["cost_model"] == str(cost) and result["simulated"]["num_steps"] > 0
    for field in ("median_ttft_ms", "p90_tpot_ms", "output_throughput", "goodput", "requests"):
        assert result[field] is not None, field
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_calibrate_a_live_server_under_http_load(bench_server, tmp_path):
    cost = tmp_path / "served.json"
    assert main(["calibrate", "--server", bench_server.url, "--out", str(cost), "--batch-sizes", "1,4",
                 "--prompt-lens", "16,64", "--output-len", "4"]) == 0
    saved = json.loads(cost.read_text())
    assert set(saved["coefficients"]) == {"base_s", "prefill_token_s", "decode_seq_s", "context_token_s"}
    assert saved["coefficients"]["base_s"] + saved["coefficients"]["prefill_token_s"] > 0
    assert saved["block_size"] == 16 and saved["kv_bytes_per_block"] > 0 and saved["model"] == "tiny"
    out = tmp_path / "sim.json"
    assert main(["simulate", "--cost-model", str(cost), "--trace", str(write_trace(tmp_path / "t.jsonl")),
                 "--no-plot", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["completed"] == 60


def test_a_sweep_finds_the_highest_rate_within_the_slos_and_the_replicas(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["simulate", "--hardware", "h100", "--model", "llama-3-8b", "--dataset", "sharegpt-like",
                 "--num-prompts", "400", "--sweep-rates", "5,20,80,320", "--slo-ttft-ms", "500",
                 "--slo-tpot-ms", "50", "--target-rate", "1000", "--no-plot", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert data["request_rates"] == [5, 20, 80, 320]
    best = runs[0]["max_rate_within_slo"]
    assert best in (5, 20, 80)  # an 8B model on one H100 holds a few dozen chat requests a second, not 320
    assert runs[0]["replicas_for_target_rate"] == {"target_rate": 1000, "replicas": -(-1000 // best)}
    # Latency grows with the rate.
    assert runs[-1]["p90_ttft_ms"] > runs[0]["p90_ttft_ms"]
    assert f"highest swept rate with 90% of requests within the SLOs: {best}" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, complaint", [
    ([], "give one of --cost-model FILE"),
    (["--hardware", "h100", "--cost-model", "x.json"], "give one of --cost-model FILE"),
    (["--cost-model", "/nonexistent.json"], "nonexistent.json"),
    (["--hardware", "h100", "--trace", "/nonexistent/trace.jsonl"], "cannot read trace"),
    (["--hardware", "h100", "--model", "llama-3-8b", "--dataset", "random", "--num-prompts", "2",
      "--input-len", "4000", "--output-len", "4000", "--max-model-len", "2048"], "do not fit max_model_len"),
])
def test_bad_simulate_commands_are_one_line_errors(arguments, complaint, capsys):
    status = main(["simulate", "--no-plot", *arguments])
    captured = capsys.readouterr()
    if status == 0:  # a request that cannot fit is reported as failed, as serve would refuse it
        assert complaint in captured.out or complaint in captured.err
        return
    assert status == 2 and captured.err.startswith("iterserve simulate: ") and complaint in captured.err
