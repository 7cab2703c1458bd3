"""The requests of a run: read from a trace file, or generated, with their arrival times.

A trace is one JSON object a line (`../shared/workloads/*.jsonl`): `id`, `arrival_s`,
`prompt_len`, `output_len`, `tenant`, `priority`. Generated datasets draw the same
fields from fixed-seed distributions; arrivals are a Poisson process (or gamma, for
`burstiness` other than 1) as in vLLM's benchmark_serving.
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path
import random

DATASETS = ("random", "sharegpt-like", "mixed")


class TraceError(ValueError):
    """A trace line that cannot be a request; the message names the file and line."""


@dataclass(slots=True)
class TraceRequest:
    id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    tenant: str = "default"
    priority: int = 0


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Every request of a jsonl trace, in arrival order; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise TraceError(f"cannot read trace {path}: {error.strerror or error}") from None
    requests, seen_ids = [], {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request = parse_line(line, f"{path}, line {line_number}")
        if request.id in seen_ids:
            raise TraceError(f"{path}, line {line_number}: id {request.id!r} already used on line "
                             f"{seen_ids[request.id]}")
        seen_ids[request.id] = line_number
        requests.append(request)
    if not requests:
        raise TraceError(f"{path}: no requests")
    return sorted(requests, key=lambda request: request.arrival_s)  # stable: ties keep file order


def parse_line(line: str, where: str) -> TraceRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise TraceError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in ("id", "arrival_s", "prompt_len", "output_len") if name not in row]
    if missing:
        raise TraceError(f"{where}: missing field(s) {', '.join(missing)}")

    def integer(name: str, minimum: int, default=None) -> int:
        value = row.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TraceError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
        return value

    arrival_s = row["arrival_s"]
    if isinstance(arrival_s, bool) or not isinstance(arrival_s, (int, float)) \
            or not math.isfinite(arrival_s) or arrival_s < 0:
        raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {arrival_s!r}")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise TraceError(f"{where}: id must be a string or an integer, got {row['id']!r}")
    tenant = row.get("tenant", "default")
    if not isinstance(tenant, str) or not tenant:
        raise TraceError(f"{where}: tenant must be a non-empty string, got {tenant!r}")
    return TraceRequest(id=str(row["id"]), arrival_s=float(arrival_s), prompt_len=integer("prompt_len", 1),
                        output_len=integer("output_len", 1), tenant=tenant,
                        priority=integer("priority", 0, default=0))


def arrival_times(count: int, request_rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds from the start; gamma gaps with mean 1/rate (burstiness 1 is Poisson, < 1 burstier)."""
    if math.isinf(request_rate):
        return [0.0] * count
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
    return times


def retime(requests: list[TraceRequest], request_rate: float, burstiness: float,
           seed: int) -> list[TraceRequest]:
    """The same requests in the same order, arriving at `request_rate` instead of the trace's times."""
    times = arrival_times(len(requests), request_rate, burstiness, random.Random(seed))
    return [TraceRequest(r.id, t, r.prompt_len, r.output_len, r.tenant, r.priority)
            for r, t in zip(requests, times)]


def generate_requests(dataset: str, num_prompts: int, seed: int, input_len: int | None = None,
                      output_len: int | None = None, range_ratio: float = 0.0) -> list[TraceRequest]:
    """Requests all arriving at 0 (`retime` spreads them out).

    `random`: uniform lengths around input_len/output_len (default 128) within +-range_ratio;
    `sharegpt-like`: log-normal lengths shaped like chat traces, medians input_len/output_len
    (default 110 and 120); `mixed`: 70% tenant `short` (16-99 tokens in), 30% tenant `long`
    (1500-2000 in), output uniform up to output_len (default 96), like `mixed-long-short.jsonl`.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    rng = random.Random(seed)
    requests = []
    for index in range(num_prompts):
        tenant = "default"
        if dataset == "random":
            prompt_len = _uniform_around(rng, input_len or 128, range_ratio)
            out_len = _uniform_around(rng, output_len or 128, range_ratio)
        elif dataset == "sharegpt-like":
            prompt_len = _lognormal(rng, input_len or 110, 0.8, 4, 1024)
            out_len = _lognormal(rng, output_len or 120, 0.7, 4, 512)
        else:
            tenant = "short" if rng.random() < 0.7 else "long"
            prompt_len = rng.randint(16, 99) if tenant == "short" else rng.randint(1500, 2000)
            out_len = rng.randint(min(16, output_len or 96), output_len or 96)
        requests.append(TraceRequest(f"{dataset}-{index:05d}", 0.0, prompt_len, out_len, tenant))
    return requests


def _uniform_around(rng: random.Random, centre: int, range_ratio: float) -> int:
    low = max(1, math.floor(centre * (1 - range_ratio)))
    return rng.randint(low, max(low, math.ceil(centre * (1 + range_ratio))))


def _lognormal(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))
