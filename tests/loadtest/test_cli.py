"""`iterserve bench` refuses bad commands with one clear line and exit status 2, before sending anything."""

from pathlib import Path
import socket

import pytest

from server.cli import main


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("arguments, complaint", [
    (["--base-url", "http://127.0.0.1:1/v1"], "without /v1"),
    (["--base-url", "127.0.0.1:8000"], "must start with http://"),
    (["--endpoint", "http://elsewhere/v1/completions"], "--endpoint must be a path"),
    (["--sweep-rates", "1,fast"], "--sweep-rates takes numbers"),
    (["--sweep-rates", "0,1"], "--sweep-rates must be > 0"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--trace", "/nonexistent/trace.jsonl"], "cannot read trace"),
    (["plot"], "the only action is `plot"),
    (["plot", "a.json"], "plot needs --out"),
    (["draw", "a.json", "--out", "x.png"], "the only action is `plot"),
])
def test_bad_commands_are_one_line_errors(arguments, complaint, capsys):
    assert main(["bench", "--no-progress", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("iterserve bench: ") and complaint in error


def test_a_malformed_trace_line_is_named(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id": "a", "arrival_s": 0, "prompt_len": 4, "output_len": 2}\n{"id": "b"\n')
    assert main(["bench", "--trace", str(trace), "--base-url", closed_port_url()]) == 2
    assert f"{trace}, line 2: not JSON" in capsys.readouterr().err


def test_without_a_server_or_tokenizer_it_says_what_to_pass(capsys):
    url = closed_port_url()
    assert main(["bench", "--base-url", url, "--num-prompts", "1", "--no-progress"]) == 2
    assert "is the server up? Or pass --model" in capsys.readouterr().err
    assert main(["bench", "--base-url", url, "--model", "m", "--num-prompts", "1", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"cannot count tokens with the server at {url}" in error and "pass --tokenizer PATH" in error


def test_a_tokenizer_that_cannot_load_is_named(tmp_path, capsys):
    assert main(["bench", "--base-url", closed_port_url(), "--model", "m", "--tokenizer", str(tmp_path / "none"),
                 "--num-prompts", "1", "--no-progress"]) == 2
    assert f"cannot load the tokenizer '{tmp_path / 'none'}'" in capsys.readouterr().err


def test_plotting_a_missing_file_is_an_error(tmp_path, capsys):
    assert main(["bench", "plot", str(tmp_path / "absent.json"), "--out", str(tmp_path / "f.png")]) == 2
    assert "cannot plot" in capsys.readouterr().err


def test_loadtest_reaches_servers_only_through_http():
    import subprocess
    import sys

    code = ("import sys, loadtest.cli, loadtest.client, loadtest.metrics, loadtest.plots, loadtest.prompts; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'engine', 'scheduler', 'kvcache', 'server'}))")
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_the_dashboard_check_fills_in_every_query_of_the_dashboard():
    import json

    from loadtest.dashboard_check import DEFAULT_DASHBOARD, dashboard_queries

    dashboard = json.loads(DEFAULT_DASHBOARD.read_text())
    queries = dashboard_queries(dashboard, "1m")
    assert len(queries) == sum(len(panel.get("targets", [])) for panel in dashboard["panels"]) > 20
    expressions = [expression for _, expression in queries]
    assert not [expression for expression in expressions if "$" in expression]
    assert all("[1m]" in expression for expression in expressions if "rate(" in expression)
    assert any("iterserve_tenant_" in expression for expression in expressions)
