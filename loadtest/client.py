"""Sends a run's requests at their arrival times over one streaming HTTP client and times every token.

Each request is a streaming POST to the completions endpoint with `max_tokens` set to
the asked length, `ignore_eos` (vLLM's extension, which iterserve shares) and
`stream_options.include_usage`, so the token count comes from the server's usage chunk
and, when a server leaves it out, from the number of chunks that carried text. Times
follow vLLM's benchmark_serving: TTFT from sending to the first chunk with text,
inter-token latencies between such chunks, TPOT = (e2e - TTFT) / (tokens - 1).
"""

import asyncio
from contextlib import nullcontext
from dataclasses import dataclass, field
import json
import time
from typing import Callable

import httpx

from loadtest.trace import TraceRequest

NOT_SENT = "not sent before the deadline"
CANCELLED = "cancelled at the deadline"


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request; times in ms, offsets in s from the run's start."""

    id: str
    tenant: str
    priority: int
    arrival_s: float  # when the trace or the arrival process asked for it
    prompt_len: int  # asked
    output_len: int  # asked
    start_s: float | None = None  # when it was sent (later than arrival_s under --max-concurrency)
    success: bool = False
    error: str | None = NOT_SENT
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says
    output_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SendOptions:
    model: str
    endpoint: str = "/v1/completions"
    max_concurrency: int | None = None
    deadline_s: float = 600.0
    send_priority: bool = True
    extra_body: dict = field(default_factory=dict)


def request_body(request: TraceRequest, prompt: str, options: SendOptions) -> dict:
    body = {
        "model": options.model,
        "prompt": prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": request.tenant,
    }
    # Only when it matters: vLLM rejects a non-zero priority unless started with --scheduling-policy priority.
    if options.send_priority and request.priority:
        body["priority"] = request.priority
    return body | options.extra_body


async def send_request(client: httpx.AsyncClient, endpoint: str, body: dict, record: RequestRecord,
                       run_start: float) -> None:
    """Streams one completion into `record`; every failure is written there, none is raised."""
    sent = time.perf_counter()
    record.start_s, record.error = sent - run_start, None
    text_times, usage, done = [], None, False
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {error_message(await response.aread())}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = f"error in stream: {error_message(data)}"
                    return
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    text_times.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except asyncio.CancelledError:
        record.error = CANCELLED
        raise
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
        return
    except (json.JSONDecodeError, AttributeError):
        record.error = "a stream event was not a JSON object"
        return
    end = time.perf_counter()
    if not done:
        record.error = "the stream ended without [DONE]"
    elif not text_times:
        record.error = "no text streamed"
    else:
        record_timings(record, sent, text_times, end, usage)


def record_timings(record: RequestRecord, sent: float, text_times: list[float], end: float,
                   usage: dict | None) -> None:
    record.success = True
    record.output_tokens = len(text_times)
    if usage:
        record.output_tokens = usage.get("completion_tokens", record.output_tokens)
        record.prompt_tokens = usage.get("prompt_tokens")
    record.ttft_ms = (text_times[0] - sent) * 1000
    record.e2el_ms = (end - sent) * 1000
    record.itl_ms = [(later - earlier) * 1000 for earlier, later in zip(text_times, text_times[1:])]
    if record.output_tokens > 1:
        record.tpot_ms = (record.e2el_ms - record.ttft_ms) / (record.output_tokens - 1)


def error_message(body: bytes | str) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return text.strip()[:300]


async def run_requests(client: httpx.AsyncClient, requests: list[TraceRequest], prompts: list[str],
                       options: SendOptions,
                       on_done: Callable[[RequestRecord], None] = lambda record: None,
                       ) -> tuple[list[RequestRecord], float]:
    """Sends each request at its arrival_s; returns a record per request and the run's duration in s.

    At `deadline_s` requests still streaming are cancelled and those not sent yet are
    left unsent; both count as failed, so every request ends with exactly one record.
    """
    records = [RequestRecord(r.id, r.tenant, r.priority, r.arrival_s, r.prompt_len, r.output_len)
               for r in requests]
    seats = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else nullcontext()
    tasks: list[asyncio.Task] = []
    run_start = time.perf_counter()

    async def one(index: int) -> None:
        async with seats:
            body = request_body(requests[index], prompts[index], options)
            await send_request(client, options.endpoint, body, records[index], run_start)
        on_done(records[index])

    async def dispatch() -> None:
        for index, request in enumerate(requests):
            delay_s = run_start + request.arrival_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.wait(tasks)

    try:
        await asyncio.wait_for(dispatch(), timeout=options.deadline_s)
    except asyncio.TimeoutError:
        pass
    finally:
        duration_s = time.perf_counter() - run_start
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records, duration_s
