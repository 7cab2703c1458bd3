"""Does one client's heavy request stall everyone else's stream? A witness measures it.

  python -m loadtest.stall --base-url http://127.0.0.1:8000 --large-requests 4 --out runs/stall.json

A witness streams a long greedy completion while `/health` is polled; the run is done
twice, once alone and once while large requests (megabytes of prompt text, which the
server must tokenize before it can refuse them for length) arrive. Reported: the
witness's largest and median gap between chunks and the slowest `/health`, each way.
Talks to the server over HTTP only.
"""

import argparse
import asyncio
from datetime import datetime, timezone
import json
from pathlib import Path
import statistics
import sys
import time

import httpx

from loadtest.cli import first_model


async def witness(http: httpx.AsyncClient, model: str, max_tokens: int, started: asyncio.Event) -> list[float]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    gaps, last = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            else:
                started.set()
            last = now
    return gaps


async def poll_health(http: httpx.AsyncClient, done: asyncio.Event) -> list[float]:
    latencies = []
    while not done.is_set():
        start = time.perf_counter()
        await http.get("/health")
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)
    return latencies


async def large_request(http: httpx.AsyncClient, model: str, num_bytes: int) -> int:
    words = "stone river light " * (num_bytes // len("stone river light "))
    response = await http.post("/v1/completions", json={"model": model, "prompt": words, "max_tokens": 1})
    return response.status_code


async def one_run(http: httpx.AsyncClient, model: str, args: argparse.Namespace, num_large: int) -> dict:
    started, done = asyncio.Event(), asyncio.Event()
    witness_task = asyncio.ensure_future(witness(http, model, args.witness_tokens, started))
    await started.wait()
    health_task = asyncio.ensure_future(poll_health(http, done))
    statuses = await asyncio.gather(*(large_request(http, model, args.large_bytes) for _ in range(num_large)))
    gaps = await witness_task
    done.set()
    health = await health_task
    return {"large_requests": num_large, "large_request_statuses": statuses,
            "witness_max_gap_ms": 1000 * max(gaps), "witness_median_gap_ms": 1000 * statistics.median(gaps),
            "health_max_ms": 1000 * max(health), "health_median_ms": 1000 * statistics.median(health)}


async def measure(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=600) as http:
        model = args.model or await first_model(http)
        alone = await one_run(http, model, args, 0)
        loaded = await one_run(http, model, args, args.large_requests)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base_url": args.base_url,
            "large_bytes": args.large_bytes, "witness_tokens": args.witness_tokens, "alone": alone, "loaded": loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.stall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--large-requests", type=int, default=4)
    parser.add_argument("--large-bytes", type=int, default=1_900_000, help="prompt text per large request")
    parser.add_argument("--witness-tokens", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = asyncio.run(measure(args))
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
