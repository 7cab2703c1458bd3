"""The GPU benchmark's own logic, run on the CPU with a tiny random model (the figures are taken on a GPU)."""

import json
import sys

from engine import gpu_bench


def test_tiny_run_writes_every_field(tmp_path, monkeypatch, smollm2_path):
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(sys, "argv", [
        "gpu_bench", "--device", "cpu", "--shape", "tiny", "--num-requests", "3", "--workloads", "8b-64x1024x256",
        "--backends", "torch", "--kv-cache-gib", "0.05", "--model-dir", str(tmp_path / "models"),
        "--tokenizer", str(smollm2_path), "--out", str(out)])
    monkeypatch.setattr(gpu_bench, "WORKLOADS", {"8b-64x1024x256": gpu_bench.Workload("8b-64x1024x256", "llama3-8b",
                                                                                       64, 40, 6)})
    gpu_bench.main()
    report = json.loads(out.read_text())
    [row] = report["results"]
    assert "error" not in row, row
    assert row["backend"] == "torch, gathered groups"
    assert row["output_tok_per_s"] > 0 and row["decode_batch"] == 3
    assert row["decode_step_ms_median"] > 0 and row["decode_step_limit_ms"] > 0
    assert report["copy_bandwidth_gb_per_s"] > 0 and report["bf16_matmul_tflop_per_s"] > 0
    # The GPU's busy time is taken under the CUDA profiler only; on a CPU the fields are there, empty.
    assert row["decode_step_device_ms"] is None and row["decode_step_host_share"] is None


def test_the_kernel_timer_sums_what_ran_inside_it():
    import torch

    with gpu_bench.kernel_timer(torch.device("cpu")) as timer:
        for _ in range(20):
            torch.randn(256, 256) @ torch.randn(256, 256)
    assert timer.busy_ms() > 0
    with gpu_bench.kernel_timer(torch.device("cpu")) as idle:
        pass
    assert idle.busy_ms() == 0


def test_physical_limit_of_the_8b_decode_step():
    # GPU.md: weights ~14.8 GB + KV 18 GB at ~3 TB/s is about 11 ms at batch 256, context ~540 ...
    memory_ms = gpu_bench.physical_limit_ms("llama3-8b", 256, 540, bandwidth=3.0e12, peak_flops=float("inf"))
    assert 10 < memory_ms < 12
    # ... and 2 x 7.2 G weights x 256 rows at 790 TFLOP/s adds under 5 ms of matmul.
    limit = gpu_bench.physical_limit_ms("llama3-8b", 256, 540, bandwidth=3.0e12, peak_flops=790e12)
    assert 4 < limit - memory_ms < 5
