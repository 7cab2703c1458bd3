"""The soak tool against a live tiny server, for a few seconds: its own logic, and that the server loses nothing."""

import json

import pytest

from loadtest.soak import ACTIONS, finished_cleanly, main

pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing(bench_server, tmp_path, capsys):
    out = tmp_path / "soak.json"
    status = main(["--base-url", bench_server.url, "--duration-s", "8", "--concurrency", "4", "--warmup-s", "2",
                   "--sample-every-s", "2", "--seed", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert status == 0, json.dumps(report["actions"], indent=1)
    assert report["nothing_lost"]
    assert report["totals"]["sent"] == sum(action["sent"] for action in report["actions"].values()) > 0
    assert set(report["actions"]) == {name for name, _ in ACTIONS}
    assert report["end"]["kv_cache_usage"] == report["end"]["running"] == 0
    assert report["memory_mib"]["end"] > 0
    assert json.loads(capsys.readouterr().out)["nothing_lost"] is True


def test_a_stream_is_clean_only_with_a_finish_reason_for_every_choice_and_done():
    def chunk(index, reason):
        return json.dumps({"choices": [{"index": index, "text": "x", "finish_reason": reason}]})

    assert finished_cleanly([chunk(0, None), chunk(0, "length"), "[DONE]"])
    assert not finished_cleanly([chunk(0, None), "[DONE]"])
    assert not finished_cleanly([chunk(0, "stop"), chunk(1, None), "[DONE]"])
    assert not finished_cleanly([chunk(0, "stop")])
    assert not finished_cleanly([json.dumps({"error": {"message": "boom"}}), "[DONE]"])
