"""`iterserve simulate` and `iterserve calibrate` end to end: a calibration of the tiny model,
a simulation with it that writes bench's JSON (per tenant too) and plot, a rate sweep that
finds the capacity and the replicas for a target, CUDA graph sizes planned from a trace (by
simulate, and the same by serve), and one-line errors for bad commands."""

import argparse
import json
from pathlib import Path

import pytest

from engine import host
from engine.config import EngineConfig
from loadtest.simulate import Machine
from scheduler.cost_model import StepCostModel, StepShape
from scheduler.roofline import hardware_preset
from scheduler.tenants import Tenants
from server.cli import main
from server.engine_args import add_engine_arguments, engine_config
from server.serve_command import add_server_arguments, planned_cuda_graph_sizes



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
    # Non-negative, and a step takes time; which coefficient carries it depends on this host's
    # noise (on a busy one the fixed cost can fit to 0 with the per-token ones taking it up).
    assert all(value >= 0 for value in saved["coefficients"].values())
    assert StepCostModel.from_json(saved).predict(StepShape(0, 1, 64)) > 0

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


def test_simulate_plans_the_cuda_graph_sizes_of_its_decode_steps(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--hardware", "h100", "--model", "llama-3-8b", "--trace",
                 str(write_trace(tmp_path / "t.jsonl")), "--cuda-graph-sizes", "auto", "--max-cuda-graph-sizes", "3",
                 "--no-plot", "--out", str(out)]) == 0
    simulated = json.loads(out.read_text())["simulated"]
    steps_by_batch = {int(batch): count for batch, count in simulated["decode_steps_by_batch"].items()}
    sizes = simulated["cuda_graph_sizes"]
    assert steps_by_batch and 1 <= len(sizes) <= 3 and sizes[-1] == max(steps_by_batch)
    assert set(sizes) <= set(steps_by_batch)
    assert f"--cuda-graph-sizes {','.join(map(str, sizes))}" in capsys.readouterr().out


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


def test_serve_plans_the_sizes_simulate_reports_for_its_device(tmp_path, capsys):
    """serve --cuda-graph-sizes auto --trace FILE runs the same simulation: on this machine's
    GPU preset (H100 where there is none, or an unknown one), the sizes simulate prints."""
    assert [hardware_preset(name) for name in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3",
                                               "Tesla T4")] == ["h200", "a100", "h100", "h100"]
    trace = write_trace(tmp_path / "t.jsonl")
    cuda = host.current().cuda
    preset = hardware_preset(cuda.name if cuda else "")
    out = tmp_path / "sim.json"
    assert main(["simulate", "--hardware", preset, "--trace", str(trace), "--cuda-graph-sizes", "auto",
                 "--no-plot", "--out", str(out)]) == 0
    simulated = json.loads(out.read_text())["simulated"]

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    add_server_arguments(parser)
    args = parser.parse_args(["--cuda-graph-sizes", "auto", "--trace", str(trace)])
    config = engine_config(args)
    assert config.cuda_graphs and config.cuda_graph_sizes is None  # auto: planned by serve, next
    assert list(planned_cuda_graph_sizes(args, config, Tenants.default_only())) == simulated["cuda_graph_sizes"]


@pytest.mark.parametrize("arguments, complaint", [
    (["--cuda-graph-sizes", "auto"], "give it --trace FILE"),
    (["--cuda-graph-sizes", "8,x"], "--cuda-graph-sizes takes auto or batch sizes"),
    (["--cuda-graph-sizes", "0,8"], "--cuda-graph-sizes must be positive"),
])
def test_bad_cuda_graph_sizes_are_one_line_errors(arguments, complaint, capsys):
    assert main(["serve", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("iterserve: ") and complaint in error


def test_a_simulated_fp8_cache_holds_twice_the_tokens_and_reads_half_the_bytes():
    def machine(kv_cache_dtype: str) -> Machine:
        return Machine.roofline("h100", "llama-3-8b", EngineConfig(kv_cache_dtype=kv_cache_dtype))

    auto, fp8 = machine("auto"), machine("fp8_e5m2")
    assert fp8.kv_bytes_per_block * 2 == auto.kv_bytes_per_block
    assert fp8.num_blocks in (2 * auto.num_blocks, 2 * auto.num_blocks + 1)  # whole blocks of the same bytes
    assert machine("bfloat16").num_blocks == auto.num_blocks  # the preset's KV is bfloat16 already
    long_decode = StepShape(prefill_tokens=0, decode_seqs=256, context_tokens=256 * 1024)  # KV twice the weights
    assert fp8.step_time(long_decode) < 0.7 * auto.step_time(long_decode)


def test_a_calibration_of_another_cache_dtype_is_refused(tmp_path):
    """Its step times and blocks were measured on the other cache."""
    calibration = tmp_path / "cpu.json"
    calibration.write_text(json.dumps({"coefficients": {}, "kv_bytes_per_block": 1024, "kv_cache_dtype": "float32"}))
    with pytest.raises(ValueError, match="calibrated with a float32 KV cache, not fp8_e5m2"):
        Machine.calibrated(str(calibration), EngineConfig(kv_cache_dtype="fp8_e5m2"))
