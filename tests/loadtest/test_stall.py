"""The stall witness against a live tiny server: its report, never its timings."""

import json

import pytest

from loadtest.stall import main

pytestmark = pytest.mark.slow


def test_the_witness_reports_both_runs(bench_server, tmp_path, capsys):
    out = tmp_path / "stall.json"
    assert main(["--base-url", bench_server.url, "--large-requests", "2", "--large-bytes", "200000",
                 "--witness-tokens", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["alone"]["large_request_statuses"] == []
    # Far over the tiny model's context: tokenized, then refused for length.
    assert report["loaded"]["large_request_statuses"] == [400, 400]
    for run in ("alone", "loaded"):
        assert 0 < report[run]["witness_median_gap_ms"] <= report[run]["witness_max_gap_ms"]
        assert 0 < report[run]["health_median_ms"] <= report[run]["health_max_ms"]
