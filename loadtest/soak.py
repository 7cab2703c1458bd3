"""A soak: mixed traffic against a live server for a set time, then an account of what was lost.

  python -m loadtest.soak --base-url http://127.0.0.1:8000 --duration-s 1800 --out runs/soak.json

Workers loop until the time is up, each request drawn at random: plain and streamed
completions, streamed chats, several choices, streams the client leaves after a chunk
or two, clients that time out, and bad requests that must get a 4xx with the envelope.
Every request has a hang limit; one that reaches it is a hang. At the end the server
must be idle with no KV block in use, and its resident memory (the front end's plus the
engine process's, where it has one) is compared with what it was after the warm-up. Talks to the server over HTTP only.
"""

import argparse
import asyncio
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
import json
from pathlib import Path
import random
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cli import first_model

WORDS = ("river stone light quiet market engine garden winter paper signal orange window letter "
         "mountain silver number cloud morning bridge story").split()
HANG_LIMIT_S = 300.0
# (action, weight): mostly well-behaved traffic, with every kind of misbehaviour in it.
ACTIONS = [("complete", 5), ("stream", 5), ("chat_stream", 3), ("choices", 1), ("leave_stream", 2),
           ("time_out", 1), ("bad_request", 3)]
# Bodies a server must refuse with a 4xx and the envelope (raw JSON text where JSON cannot say it).
BAD_BODIES = [
    '{"prompt": "\\ud800 lone surrogate", "max_tokens": 4}',
    '{"messages": [{"role": "hacker", "content": "hi"}]}',
    '{"prompt": "hi", "temperature": -1}',
    '{"prompt": "hi", "max_tokens": 100000000}',
    '{"prompt": "hi", "n": 1000}',
    '{"prompt": [999999999]}',
    '{"prompt": "hi", "stop": [""]}',
    '{not json',
    '{"messages": []}',
]


@dataclass(slots=True)
class ActionStats:
    sent: int = 0
    as_expected: int = 0
    refused_429: int = 0
    server_errors: int = 0  # 5xx
    hangs: int = 0
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)  # the first few unexpected outcomes

    def note(self, outcome: str) -> None:
        self.unexpected += 1
        if len(self.examples) < 5:
            self.examples.append(outcome[:300])


@dataclass(slots=True)
class ServerSample:
    at_s: float
    resident_memory_bytes: float
    kv_cache_usage: float
    running: float
    waiting: float


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120)))


async def sample_server(http: httpx.AsyncClient, start: float) -> ServerSample:
    values = {}
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for metric in family.samples:
            values[metric.name] = metric.value
    # With --engine-core process the engine's own process holds most of the memory.
    resident = values.get("process_resident_memory_bytes", float("nan")) + values.get(
        "iterserve_engine_process_resident_memory_bytes", 0.0)
    return ServerSample(time.monotonic() - start, resident,
                        values.get("iterserve_kv_cache_usage_perc", float("nan")),
                        values.get("iterserve_num_requests_running", float("nan")),
                        values.get("iterserve_num_requests_waiting", float("nan")))


def sse_events(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def finished_cleanly(events: list[str]) -> bool:
    """Ended by [DONE], after a chunk that gives every choice it saw a finish reason."""
    if not events or events[-1] != "[DONE]":
        return False
    reasons = {}
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            return False
        for choice in chunk.get("choices", []):
            reasons[choice["index"]] = choice.get("finish_reason") or reasons.get(choice["index"])
    return bool(reasons) and all(reasons.values())


async def run_action(action: str, http: httpx.AsyncClient, model: str, rng: random.Random) -> str | None:
    """One request; None when it went as it should, else what went wrong."""
    completion = {"model": model, "prompt": prompt(rng), "max_tokens": rng.randint(1, 64),
                  "temperature": rng.choice([0.0, 0.7, 1.0])}
    if action == "complete":
        response = await http.post("/v1/completions", json=completion)
        if response.status_code != 200:
            return f"{response.status_code}: {response.text}"
        return None if response.json()["choices"][0]["finish_reason"] in ("stop", "length") else response.text
    if action == "choices":
        response = await http.post("/v1/completions", json={**completion, "n": rng.randint(2, 4)})
        if response.status_code != 200:
            return f"{response.status_code}: {response.text}"
        return None if all(c["finish_reason"] for c in response.json()["choices"]) else response.text
    if action in ("stream", "chat_stream", "leave_stream"):
        path, body = "/v1/completions", {**completion, "stream": True}
        if action == "chat_stream":
            path = "/v1/chat/completions"
            body = {"model": model, "messages": [{"role": "user", "content": completion["prompt"]}],
                    "max_tokens": completion["max_tokens"], "stream": True}
        leave_after = rng.randint(1, 3) if action == "leave_stream" else None
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return f"{response.status_code}: {(await response.aread()).decode(errors='replace')}"
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if leave_after is not None and len(sse_events(lines)) >= leave_after:
                    return None  # leaving is the point: the server must abort it and free its blocks
        return None if finished_cleanly(sse_events(lines)) else f"stream ended without a final event: {lines[-3:]}"
    if action == "time_out":
        try:
            await http.post("/v1/completions", json={**completion, "max_tokens": 400, "ignore_eos": True},
                            timeout=httpx.Timeout(rng.uniform(0.05, 1.0), connect=30))
        except httpx.TimeoutException:
            pass
        return None
    body = rng.choice(BAD_BODIES)
    target = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = await http.post(target, content=body.encode(), headers={"Content-Type": "application/json"})
    if not 400 <= response.status_code < 500:
        return f"a bad request got {response.status_code}: {body}"
    error = response.json().get("error", {})
    return None if {"message", "type", "param", "code"} <= set(error) else f"no envelope: {response.text}"


async def worker(http: httpx.AsyncClient, model: str, seed: int, deadline: float,
                 stats: dict[str, ActionStats]) -> None:
    rng = random.Random(seed)
    names, weights = zip(*ACTIONS)
    while time.monotonic() < deadline:
        action = rng.choices(names, weights)[0]
        record = stats[action]
        record.sent += 1
        try:
            outcome = await asyncio.wait_for(run_action(action, http, model, rng), HANG_LIMIT_S)
        except asyncio.TimeoutError:
            record.hangs += 1
            continue
        except httpx.HTTPError as error:
            record.note(f"transport error: {type(error).__name__}: {error}")
            continue
        if outcome is None:
            record.as_expected += 1
        elif outcome.startswith("429"):
            record.refused_429 += 1
        else:
            if outcome[:1] == "5":
                record.server_errors += 1
            record.note(outcome)


async def soak(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=HANG_LIMIT_S) as http:
        model = args.model or await first_model(http)
        start = time.monotonic()
        samples = [await sample_server(http, start)]
        stats = {name: ActionStats() for name, _ in ACTIONS}
        deadline = start + args.duration_s
        workers = [asyncio.ensure_future(worker(http, model, args.seed + index, deadline, stats))
                   for index in range(args.concurrency)]
        while not all(task.done() for task in workers):
            await asyncio.wait(workers, timeout=args.sample_every_s)
            samples.append(await sample_server(http, start))
        await asyncio.gather(*workers)
        idle_deadline = time.monotonic() + 60
        end = await sample_server(http, start)
        while (end.running or end.waiting or end.kv_cache_usage) and time.monotonic() < idle_deadline:
            await asyncio.sleep(1)
            end = await sample_server(http, start)
        samples.append(end)
    warm = next((s for s in samples if s.at_s >= args.warmup_s), samples[0])
    totals = {key: sum(getattr(s, key) for s in stats.values())
              for key in ("sent", "as_expected", "refused_429", "server_errors", "hangs", "unexpected")}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url, "duration_s": args.duration_s, "concurrency": args.concurrency,
        "totals": totals,
        "actions": {name: asdict(record) for name, record in stats.items()},
        "end": asdict(end),
        "memory_mib": {"start": samples[0].resident_memory_bytes / 2**20,
                       "after_warmup": warm.resident_memory_bytes / 2**20,
                       "end": end.resident_memory_bytes / 2**20},
        "samples": [asdict(s) for s in samples],
        "nothing_lost": totals["server_errors"] == totals["hangs"] == totals["unexpected"] == 0
                        and end.running == end.waiting == end.kv_cache_usage == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="memory is compared from this time on")
    parser.add_argument("--sample-every-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="the report as JSON")
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args))
    summary = {key: report[key] for key in ("totals", "end", "memory_mib", "nothing_lost")}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["nothing_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
