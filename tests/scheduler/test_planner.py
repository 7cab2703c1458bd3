"""The static-shape planner: every request once, in a shape it fits; the shapes chosen are the
cheapest segmentation (checked against brute force); limits are met where they can be and
reported where they cannot; and `iterserve plan` writes the plan."""

from itertools import combinations
import json
import random

import pytest

from scheduler.planner import PlanCosts, PlanError, PlanLimits, PlanRequest, _batches, plan, plan_capture_sizes
from server.cli import main


def workload(n: int, seed: int = 0) -> list[PlanRequest]:
    rng = random.Random(seed)
    return [PlanRequest(f"r{i}", rng.choice([rng.randint(10, 200), rng.randint(500, 2000)]), rng.randint(1, 300))
            for i in range(n)]


def brute_force_cost(requests, costs, limits) -> float:
    """Every way of cutting the sorted distinct aligned lengths into at most K runs."""
    align = limits.align
    aligned = sorted({-(-r.prompt_len // align) * align for r in requests})
    best = float("inf")
    for num_cuts in range(min(limits.max_shapes, len(aligned))):
        for cuts in combinations(range(len(aligned) - 1), num_cuts):
            bounds = [aligned[c] for c in cuts] + [aligned[-1]]
            total, low = 0.0, 0
            for shape in bounds:
                group = [r for r in requests if low < -(-r.prompt_len // align) * align <= shape]
                total += costs.compile_cost * shape ** 2 + sum(b.cost for b in _batches(group, shape, costs,
                                                                                        limits.max_batch))
                low = shape
            best = min(best, total)
    return best


def test_every_request_is_placed_once_in_an_aligned_shape_it_fits():
    requests = workload(500)
    result = plan(requests, PlanCosts(), PlanLimits(max_shapes=4, align=64, max_batch=32))
    placed = [request_id for batch in result.batches for request_id in batch.ids]
    assert sorted(placed) == sorted(r.id for r in requests)
    lengths = {r.id: r.prompt_len for r in requests}
    assert len(result.shapes) <= 4 and all(shape % 64 == 0 for shape in result.shapes)
    for batch in result.batches:
        assert len(batch.ids) <= 32 and all(lengths[i] <= batch.shape for i in batch.ids)
    metrics = result.metrics
    assert metrics["total_cost"] == pytest.approx(metrics["compile_cost"] + metrics["batch_overhead_cost"]
                                                  + metrics["prefill_cost"] + metrics["decode_cost"])
    assert metrics["feasible"] and metrics["limits"]["max_shapes"]["value"] == len(result.shapes)


@pytest.mark.parametrize("seed", range(6))
def test_the_shapes_are_the_cheapest_segmentation(seed):
    rng = random.Random(seed)
    requests = [PlanRequest(f"r{i}", rng.randint(1, 700), rng.randint(1, 100)) for i in range(60)]
    costs = PlanCosts(batch_overhead=rng.uniform(0, 20), compile_cost=rng.choice([0.0, 1e-4, 1e-3]))
    limits = PlanLimits(max_shapes=rng.randint(1, 4), align=64, max_batch=rng.choice([4, 16]))
    assert plan(requests, costs, limits).metrics["total_cost"] == pytest.approx(
        brute_force_cost(requests, costs, limits))


def test_more_shapes_never_cost_more_when_compiling_is_free():
    requests = workload(300, seed=3)
    totals = [plan(requests, PlanCosts(compile_cost=0.0), PlanLimits(max_shapes=k)).metrics["total_cost"]
              for k in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]


def test_a_padding_limit_is_met_at_a_price_and_an_impossible_one_is_reported():
    requests = workload(300, seed=4)
    # Unpriced, six shapes leave 37% padding (the cost model prefers fewer, larger batches).
    free = plan(requests, PlanCosts(), PlanLimits(max_shapes=6))
    bound = free.metrics["padding_ratio"] * 0.6
    limited = plan(requests, PlanCosts(), PlanLimits(max_shapes=6, max_padding_ratio=bound))
    assert limited.metrics["feasible"] and len(limited.shapes) <= 6
    assert limited.metrics["padding_ratio"] <= bound
    assert limited.metrics["total_cost"] >= free.metrics["total_cost"]
    impossible = plan(requests, PlanCosts(), PlanLimits(max_shapes=1, max_padding_ratio=0.01))
    assert not impossible.metrics["feasible"] and not impossible.metrics["limits"]["max_padding_ratio"]["ok"]


def test_bad_input_is_refused():
    with pytest.raises(PlanError, match="appears twice"):
        plan([PlanRequest("a", 4, 4), PlanRequest("a", 5, 5)], PlanCosts(), PlanLimits(max_shapes=1))
    with pytest.raises(PlanError, match="at least 1"):
        plan([PlanRequest("a", 0, 4)], PlanCosts(), PlanLimits(max_shapes=1))


def test_iterserve_plan_writes_the_plan(tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "prompt_len": r.prompt_len, "gen_len": r.gen_len}) + "\n"
                            for r in workload(200)))
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--max-shapes", "3", "--align", "64", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) == {"shapes", "batches", "metrics"} and len(written["shapes"]) <= 3
    assert sum(len(batch["ids"]) for batch in written["batches"]) == 200
    assert main(["plan", str(path), "--max-shapes", "1", "--max-p95-latency", "1", "--out", str(out)]) == 1
    assert "limit max_p95_latency" in capsys.readouterr().err
    path.write_text('{"id": "a", "prompt_len": 4}\n')
    assert main(["plan", str(path), "--max-shapes", "1", "--out", str(out)]) == 2
    assert "line 1: needs id, prompt_len and gen_len" in capsys.readouterr().err


def padded_rows(steps_by_batch: dict[int, int], sizes: list[int]) -> int:
    return sum(count * (min(s for s in sizes if s >= batch) - batch) for batch, count in steps_by_batch.items())


@pytest.mark.parametrize("seed", range(6))
def test_capture_sizes_pad_the_fewest_rows_of_any_choice(seed):
    rng = random.Random(seed)
    steps_by_batch = {rng.randint(1, 64): rng.randint(1, 500) for _ in range(rng.randint(1, 9))}
    max_sizes = rng.randint(1, 4)
    sizes = plan_capture_sizes(steps_by_batch, max_sizes)
    observed = sorted(steps_by_batch)
    assert len(sizes) <= max_sizes and sizes == sorted(sizes) and sizes[-1] == observed[-1]
    # Brute force: every set of at most K sizes from 1 to the largest batch that holds it.
    best = min(padded_rows(steps_by_batch, list(others) + [observed[-1]])
               for k in range(max_sizes) for others in combinations(range(1, observed[-1]), k))
    assert padded_rows(steps_by_batch, sizes) == best


def test_capture_sizes_follow_the_steps_not_powers_of_two():
    # Most steps at 24 and 40 running requests: powers of two would pad them to 32 and 64.
    # A few single-request steps padded to 24 cost less than the 40s padded to 41.
    steps_by_batch = {1: 5, 24: 1000, 40: 2000, 41: 3}
    sizes = plan_capture_sizes(steps_by_batch, max_sizes=3)
    assert sizes == [24, 40, 41]
    assert padded_rows(steps_by_batch, sizes) == 23 * 5 < padded_rows(steps_by_batch, [1, 2, 4, 8, 16, 32, 64])
    assert plan_capture_sizes({}, 4) == []

