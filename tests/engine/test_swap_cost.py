"""The swap-cost measurement on the tiny model: its report, never its timings."""

import json

from engine.swap_cost import CONTEXTS, main


def test_the_swap_cost_report_covers_every_context(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "swap.json"
    assert main(["--model", str(tiny_model_path), "--dtype", "float32", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert [row["context_tokens"] for row in report["rows"]] == [c for c in CONTEXTS if c < 512]  # its positions
    for row in report["rows"]:
        assert row["blocks"] == -(-row["context_tokens"] // 16)
        assert row["swap_out_and_in_ms"] > 0 and row["recompute_ms"] > 0
    assert report["kv_bytes_per_block"] > 0
