"""`make bench` never dies on a dtype: failures become rows, emulated dtypes are marked, the report is written."""

import argparse
import json

import pytest

from engine import bench, cpu_kernels, sampler_bench


def args(**overrides) -> argparse.Namespace:
    defaults = dict(max_num_seqs=None, max_num_batched_tokens=None, profile=False, full_emulated=False,
                    workloads=None, kv_cache_dtype="auto")
    return argparse.Namespace(**defaults | overrides)


def refuse_to_load(*_, **__):
    raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")


def test_an_engine_that_cannot_load_is_recorded_and_the_report_written(tmp_path, monkeypatch, cpu_without):
    cpu_without("avx512_bf16", "amx_bf16")  # bfloat16 emulated, as on an AVX2 host
    monkeypatch.setattr(bench, "LLM", refuse_to_load)
    monkeypatch.setattr(bench, "run_hf", lambda case, dtype, _: (bench.result(case, dtype, 64, 8192, 80.0), None))
    out = tmp_path / "offline.json"
    report = bench.Report(out)
    bench.run_dtype("bfloat16", list(bench.CASES), args(), report)

    saved = json.loads(out.read_text())
    rows = {row["case"]: row for row in saved["results"]}
    assert rows["iterserve-64x128"]["error"].startswith("RuntimeError: mkldnn_reorder_linear_weight")
    assert rows["hf-static-64x128"]["output_tok_per_s"] == 102.4
    assert "--full-emulated" in rows["iterserve-offline-256"]["skipped"]
    assert "--full-emulated" in rows["hf-generate-batch-64x128"]["skipped"]
    assert all(row["emulated"] for row in saved["results"])
    assert saved["machine"]["host"]["cpu"]["native_bfloat16"] is False
    bench.print_table(report.results)  # error and skipped rows print too


def test_native_dtypes_run_every_case_unmarked(tmp_path, monkeypatch):
    ran = []

    def run_hf(case, dtype, _):
        ran.append(case)
        return bench.result(case, dtype, 64, 8192, 80.0), None

    monkeypatch.setattr(bench, "LLM", refuse_to_load)
    monkeypatch.setattr(bench, "run_hf", run_hf)
    report = bench.Report(None)
    bench.run_dtype("float32", list(bench.CASES), args(), report)
    assert ran == ["hf-static-64x128", "hf-generate-batch-64x128"]
    assert [row["case"] for row in report.results] == ["iterserve-offline-256", "iterserve-64x128", *ran]
    assert not any(row.get("emulated") for row in report.results)


def test_the_sampler_benchmark_times_both_draws_in_every_setting():
    if cpu_kernels.load() is None:
        pytest.skip("no compiler here: there is no kernel draw to time")
    results = sampler_bench.run(rows=4, vocab=300, dtype="bfloat16", isa=None, repeats=1)
    assert [row["setting"] for row in results] == list(sampler_bench.SETTINGS)
    assert all(row["torch_ms"] > 0 and row["kernel_ms"] > 0 for row in results)
