"""The static-shape batch planner (`iterserve plan`): a known set of requests, at most K padded
prompt shapes, and a cost model; which shapes, and which requests in which batch of which shape,
cost least within the limits.

Engines that compile per shape (CUDA graph captures, TPU and TensorRT builds) pad every prompt
of a batch to the batch's shape. A plan pays, in the cost model's units:
- per shape, its compile cost, `compile_cost * length**2`;
- per batch, `batch_overhead`, `prefill_cost` per padded prompt token (every slot of the batch,
  at the shape's length), and decode steps until its longest generation ends, each costing
  `decode_step_cost` plus `decode_token_cost` per request of the batch.

How it plans: with requests sorted by prompt length, a shape serves a run of consecutive
lengths, padded to the run's longest (aligned up to `align`), so choosing the shapes is a
one-dimensional segmentation solved exactly by dynamic programming over the distinct aligned
lengths (at most K segments). Within a shape, requests are batched in order of generation
length, `max_batch` at a time, so a batch's longest generation wastes least on the others;
that is optimal for the decode term with full batches. A padding-ratio limit is met by pricing
padding (a Lagrange multiplier, found by bisection) until the plan meets it. Batches run
cheapest first after every shape is compiled (shortest job first minimises latency), and
each request's latency is the time its batch ends; the P95 limit is checked, not optimised.
"""

from dataclasses import asdict, dataclass, field
import itertools
import math


@dataclass(frozen=True, slots=True)
class PlanRequest:
    id: str
    prompt_len: int
    gen_len: int


@dataclass(frozen=True, slots=True)
class PlanCosts:
    batch_overhead: float = 5.0
    compile_cost: float = 1e-4  # times the shape's length squared
    prefill_cost: float = 0.01  # per padded prompt token
    decode_step_cost: float = 1.0  # per decode step of a batch
    decode_token_cost: float = 0.01  # per request of the batch per decode step


@dataclass(frozen=True, slots=True)
class PlanLimits:
    max_shapes: int
    align: int = 64
    max_batch: int = 64
    max_padding_ratio: float | None = None  # padded prompt tokens / real prompt tokens - 1
    max_p95_latency: float | None = None  # in the cost model's units, from the start


@dataclass(slots=True)
class Batch:
    shape: int
    ids: list[str]
    max_gen_len: int
    cost: float


@dataclass(slots=True)
class Plan:
    shapes: list[int]
    batches: list[Batch]
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"shapes": self.shapes, "batches": [asdict(batch) for batch in self.batches], "metrics": self.metrics}


class PlanError(ValueError):
    """Input that cannot be planned; the message says why."""


def plan(requests: list[PlanRequest], costs: PlanCosts, limits: PlanLimits) -> Plan:
    _check(requests, limits)
    best = _plan_with_padding_price(requests, costs, limits, 0.0)
    if limits.max_padding_ratio is not None and best.metrics["padding_ratio"] > limits.max_padding_ratio:
        low, high = 0.0, costs.prefill_cost + 1.0
        while _plan_with_padding_price(requests, costs, limits, high).metrics["padding_ratio"] > \
                limits.max_padding_ratio and high < 1e9:
            high *= 4
        for _ in range(40):
            middle = (low + high) / 2
            if _plan_with_padding_price(requests, costs, limits, middle).metrics["padding_ratio"] > \
                    limits.max_padding_ratio:
                low = middle
            else:
                high = middle
        best = _plan_with_padding_price(requests, costs, limits, high)
    _verify(best, requests)
    _check_limits(best, limits)
    return best


def _plan_with_padding_price(requests: list[PlanRequest], costs: PlanCosts, limits: PlanLimits,
                             padding_price: float) -> Plan:
    ordered = sorted(requests, key=lambda request: request.prompt_len)
    aligned = [_align(request.prompt_len, limits.align) for request in ordered]
    # Candidate shapes: the distinct aligned lengths; ends[j] is one past the last request of shape j.
    lengths = sorted(set(aligned))
    ends = [max(i for i, value in enumerate(aligned) if value == length) + 1 for length in lengths]
    starts = [0] + ends[:-1]
    m = len(lengths)

    def segment(first: int, last: int) -> tuple[float, list[Batch]]:
        """Shape lengths[last] for candidate groups first..last."""
        shape = lengths[last]
        group = ordered[starts[first]:ends[last]]
        batches = _batches(group, shape, costs, limits.max_batch)
        padding = sum(shape - request.prompt_len for request in group)
        return (costs.compile_cost * shape ** 2 + sum(batch.cost for batch in batches)
                + padding_price * padding), batches

    cache: dict[tuple[int, int], tuple[float, list[Batch]]] = {}

    def cost_of(first: int, last: int) -> float:
        if (first, last) not in cache:
            cache[(first, last)] = segment(first, last)
        return cache[(first, last)][0]

    segments = best_segments(m, limits.max_shapes, cost_of)
    shapes, batches = [], []
    for first, last in segments:
        cost_of(first, last)
        shapes.append(lengths[last])
        batches.extend(cache[(first, last)][1])
    result = Plan(shapes, sorted(batches, key=lambda batch: batch.cost))  # cheapest first
    result.metrics = _metrics(result, ordered, costs)
    return result


def best_segments(num_candidates: int, max_segments: int, cost_of) -> list[tuple[int, int]]:
    """The split of candidates 0..num_candidates-1 into at most `max_segments` runs of consecutive
    candidates, (first, last) each, whose `cost_of(first, last)` add up to least; exact, by
    dynamic programming in O(max_segments * num_candidates**2) calls."""
    m, k = num_candidates, min(max_segments, num_candidates)
    # best[s][j]: least cost covering candidates 0..j with s segments, the last one ending at j.
    inf = math.inf
    best = [[inf] * m for _ in range(k + 1)]
    choice = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = cost_of(0, j)
    for s in range(2, k + 1):
        for j in range(s - 1, m):
            for i in range(s - 2, j):
                value = best[s - 1][i] + cost_of(i + 1, j)
                if value < best[s][j]:
                    best[s][j], choice[s][j] = value, i
    used = min(range(1, k + 1), key=lambda s: best[s][m - 1])
    segments, j, s = [], m - 1, used
    while s >= 1:
        first = choice[s][j] + 1 if s > 1 else 0
        segments.append((first, j))
        j, s = first - 1, s - 1
    segments.reverse()
    return segments


def plan_capture_sizes(steps_by_batch: dict[int, int], max_sizes: int) -> list[int]:
    """The at most `max_sizes` decode batch sizes to capture as graphs so that the given
    pure-decode steps (their count by batch size, from a simulated run of the workload) pad
    the fewest rows in all, each step running at the smallest captured size that holds it.

    Padding rows is what a size costs: a padded row runs every linear layer for nothing (its
    attention reads one scratch slot). The largest size observed is always captured, and the
    best sizes are observed ones (a size between two observed ones pads more than the lower
    one would), so the same segmentation as the shapes' solves it exactly.
    """
    sizes = sorted(size for size, count in steps_by_batch.items() if count > 0 and size > 0)
    if not sizes or max_sizes < 1:
        return []
    steps = list(itertools.accumulate((steps_by_batch[size] for size in sizes), initial=0))
    rows = list(itertools.accumulate((steps_by_batch[size] * size for size in sizes), initial=0))

    def padding(first: int, last: int) -> int:
        return sizes[last] * (steps[last + 1] - steps[first]) - (rows[last + 1] - rows[first])

    return [sizes[last] for _, last in best_segments(len(sizes), max_sizes, padding)]


def _batches(group: list[PlanRequest], shape: int, costs: PlanCosts, max_batch: int) -> list[Batch]:
    by_generation = sorted(group, key=lambda request: request.gen_len)
    batches = []
    for index in range(0, len(by_generation), max_batch):
        members = by_generation[index:index + max_batch]
        longest = members[-1].gen_len
        cost = (costs.batch_overhead + costs.prefill_cost * len(members) * shape
                + longest * (costs.decode_step_cost + costs.decode_token_cost * len(members)))
        batches.append(Batch(shape, [request.id for request in members], longest, cost))
    return batches


def _metrics(result: Plan, requests: list[PlanRequest], costs: PlanCosts) -> dict:
    compile_cost = sum(costs.compile_cost * shape ** 2 for shape in result.shapes)
    sizes = [len(batch.ids) for batch in result.batches]
    prompt_real = sum(request.prompt_len for request in requests)
    prompt_padded = sum(batch.shape * len(batch.ids) for batch in result.batches)
    latencies, clock = [], compile_cost
    for batch in result.batches:
        clock += batch.cost
        latencies.extend([clock] * len(batch.ids))
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]
    return {
        "total_cost": compile_cost + sum(batch.cost for batch in result.batches),
        "compile_cost": compile_cost,
        "batch_overhead_cost": costs.batch_overhead * len(result.batches),
        "prefill_cost": costs.prefill_cost * prompt_padded,
        "decode_cost": sum(batch.max_gen_len * (costs.decode_step_cost + costs.decode_token_cost * len(batch.ids))
                           for batch in result.batches),
        "padding_ratio": prompt_padded / prompt_real - 1,
        "p95_latency": p95,
        "num_shapes": len(result.shapes),
        "num_batches": len(result.batches),
        "largest_batch": max(sizes),
    }


def _align(length: int, align: int) -> int:
    return -(-length // align) * align


def _check(requests: list[PlanRequest], limits: PlanLimits) -> None:
    if not requests:
        raise PlanError("no requests to plan")
    if limits.max_shapes < 1 or limits.align < 1 or limits.max_batch < 1:
        raise PlanError("--max-shapes, --align and --max-batch must be at least 1")
    seen = set()
    for request in requests:
        if request.id in seen:
            raise PlanError(f"request id {request.id!r} appears twice")
        seen.add(request.id)
        if request.prompt_len < 1 or request.gen_len < 1:
            raise PlanError(f"request {request.id!r}: prompt_len and gen_len must be at least 1")


def _verify(result: Plan, requests: list[PlanRequest]) -> None:
    """Every request in exactly one batch, of a shape it fits, of a shape the plan compiles."""
    lengths = {request.id: request.prompt_len for request in requests}
    placed = [request_id for batch in result.batches for request_id in batch.ids]
    assert sorted(placed) == sorted(lengths), "a request is missing from the plan or placed twice"
    assert len(result.shapes) == len(set(result.shapes))
    for batch in result.batches:
        assert batch.shape in result.shapes
        assert all(lengths[request_id] <= batch.shape for request_id in batch.ids), "a prompt exceeds its shape"


def _check_limits(result: Plan, limits: PlanLimits) -> None:
    metrics = result.metrics
    checks = {
        "max_shapes": (limits.max_shapes, metrics["num_shapes"]),
        "max_batch": (limits.max_batch, metrics["largest_batch"]),
        "max_padding_ratio": (limits.max_padding_ratio, metrics["padding_ratio"]),
        "max_p95_latency": (limits.max_p95_latency, metrics["p95_latency"]),
    }
    metrics["limits"] = {name: {"limit": limit, "value": value, "ok": limit is None or value <= limit + 1e-9}
                         for name, (limit, value) in checks.items()}
    metrics["feasible"] = all(check["ok"] for check in metrics["limits"].values())
