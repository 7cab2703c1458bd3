"""Figures from hand-made results, including passes where nothing completed."""

from dataclasses import asdict
import json

from loadtest.client import RequestRecord
from loadtest.metrics import summarize, summarize_by_tenant
from loadtest.plots import plot_files, plot_run


def result(request_rate, succeed: bool = True) -> dict:
    records = []
    for index, tenant in enumerate(["chat", "batch", "chat"]):
        record = RequestRecord(f"r{index}", tenant, 0, index * 0.1, 8, 3, start_s=index * 0.1)
        if succeed:
            record.success, record.error, record.output_tokens = True, None, 3
            record.ttft_ms, record.tpot_ms, record.e2el_ms, record.itl_ms = 10.0 + index, 2.0, 14.0 + index, [2.0, 2.0]
        records.append(record)
    run = {"label": None, "model_id": "m", "request_rate": request_rate} | summarize(records, 1.0)
    run["per_tenant"] = summarize_by_tenant(records, 1.0)
    run["requests"] = [asdict(record) for record in records]
    return run


def test_one_run_draws_cdfs_and_ttft_over_time(tmp_path):
    assert plot_run(result("inf"), tmp_path / "run.png").stat().st_size > 0
    assert plot_run(result(2.0, succeed=False), tmp_path / "failed.png").stat().st_size > 0


def test_files_are_drawn_side_by_side(tmp_path):
    single = tmp_path / "a.json"
    single.write_text(json.dumps(result("trace")))
    sweep = tmp_path / "b.json"
    sweep.write_text(json.dumps({"label": "peer", "runs": [result(1.0), result(2.0, succeed=False), result("inf")]}))
    assert plot_files([single, single], tmp_path / "cdfs.png").stat().st_size > 0
    assert plot_files([sweep, single], tmp_path / "rates.png", labels=["x", "y"]).stat().st_size > 0
