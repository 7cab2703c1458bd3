"""Trace parsing and generated requests: pure logic, milliseconds."""

import json
import math
import random

import pytest

from loadtest.trace import TraceError, arrival_times, generate_requests, read_trace, retime

GOOD = {"id": "r1", "arrival_s": 0.5, "prompt_len": 12, "output_len": 7, "tenant": "chat", "priority": 1}


def write_trace(tmp_path, lines: list[str]):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_every_field_and_sorts_by_arrival(tmp_path):
    later = dict(GOOD, id="r0", arrival_s=2.0)
    minimal = {"id": 7, "arrival_s": 1, "prompt_len": 3, "output_len": 1}
    path = write_trace(tmp_path, [json.dumps(later), "", json.dumps(GOOD), json.dumps(minimal)])
    requests = read_trace(path)
    assert [r.id for r in requests] == ["r1", "7", "r0"]
    assert (requests[0].prompt_len, requests[0].output_len, requests[0].tenant, requests[0].priority) == \
        (12, 7, "chat", 1)
    assert (requests[1].tenant, requests[1].priority, requests[1].arrival_s) == ("default", 0, 1.0)


def test_reads_the_shared_workloads():
    from pathlib import Path

    folder = Path("/work/shared/workloads")
    if not folder.exists():
        pytest.skip("no shared workloads here")
    for path in folder.glob("*.jsonl"):
        assert read_trace(path)


@pytest.mark.parametrize("bad_line, complaint", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "prompt_len"}), "missing field(s) prompt_len"),
    (json.dumps(dict(GOOD, prompt_len=0)), "prompt_len must be an integer >= 1"),
    (json.dumps(dict(GOOD, output_len=2.5)), "output_len must be an integer >= 1"),
    (json.dumps(dict(GOOD, output_len=True)), "output_len must be an integer >= 1"),
    (json.dumps(dict(GOOD, arrival_s=-1)), "arrival_s must be a finite number >= 0"),
    (json.dumps(dict(GOOD, arrival_s="soon")), "arrival_s must be a finite number >= 0"),
    (json.dumps(dict(GOOD, priority=-1)), "priority must be an integer >= 0"),
    (json.dumps(dict(GOOD, tenant="")), "tenant must be a non-empty string"),
    (json.dumps(dict(GOOD, id=None)), "id must be a string or an integer"),
])
def test_a_malformed_line_is_rejected_by_its_number(tmp_path, bad_line, complaint):
    path = write_trace(tmp_path, [json.dumps(dict(GOOD, id="a")), "", bad_line, json.dumps(dict(GOOD, id="z"))])
    with pytest.raises(TraceError) as error:
        read_trace(path)
    assert f"{path}, line 3:" in str(error.value)
    assert complaint in str(error.value)


def test_a_repeated_id_names_both_lines(tmp_path):
    path = write_trace(tmp_path, [json.dumps(GOOD), json.dumps(dict(GOOD, arrival_s=3))])
    with pytest.raises(TraceError, match=r"line 2: id 'r1' already used on line 1"):
        read_trace(path)


def test_an_empty_or_missing_trace_is_an_error(tmp_path):
    with pytest.raises(TraceError, match="no requests"):
        read_trace(write_trace(tmp_path, ["", "  "]))
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "absent.jsonl")


def test_arrivals_are_seeded_and_have_the_asked_mean_rate():
    times = arrival_times(2000, 4.0, 1.0, random.Random(3))
    assert times == arrival_times(2000, 4.0, 1.0, random.Random(3))
    assert times[0] == 0.0 and times == sorted(times)
    assert 3.6 < len(times) / times[-1] < 4.4
    assert arrival_times(5, math.inf, 1.0, random.Random(0)) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_times(5, 0.0, 1.0, random.Random(0))


def test_retime_keeps_everything_but_the_arrivals():
    requests = generate_requests("mixed", 20, seed=1)
    timed = retime(requests, 2.0, 0.5, seed=1)
    assert [(r.id, r.prompt_len, r.output_len, r.tenant) for r in timed] == \
        [(r.id, r.prompt_len, r.output_len, r.tenant) for r in requests]
    assert [r.arrival_s for r in timed] == sorted(r.arrival_s for r in timed)
    assert timed[-1].arrival_s > 0


@pytest.mark.parametrize("dataset", ["random", "sharegpt-like", "mixed"])
def test_generated_requests_are_seeded_and_in_range(dataset):
    requests = generate_requests(dataset, 200, seed=5, input_len=40, output_len=30, range_ratio=0.5)
    assert requests == generate_requests(dataset, 200, seed=5, input_len=40, output_len=30, range_ratio=0.5)
    assert len({r.id for r in requests}) == 200
    assert all(r.prompt_len >= 1 and r.output_len >= 1 and r.arrival_s == 0.0 for r in requests)
    if dataset == "random":
        assert all(20 <= r.prompt_len <= 60 and 15 <= r.output_len <= 45 for r in requests)
    if dataset == "mixed":
        assert {r.tenant for r in requests} == {"short", "long"}
        assert all((r.prompt_len < 100) == (r.tenant == "short") for r in requests)


def test_an_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        generate_requests("lmsys", 3, seed=0)
