"""`iterserve calibrate --server URL`: the step cost model of a live server, fitted under load.

A server's engine loop fits its cost model to every iteration it runs (scheduler/cost_model.py),
HTTP streaming, detokenizing and the event loop's share of the interpreter included: a step
served that way takes longer than the same step run offline. This drives the same grid of
batch sizes and prompt lengths as the offline `iterserve calibrate`, through
`/v1/completions` with token-id prompts, then reads the fitted coefficients from `/metrics`
and the KV cache's geometry from `/version`, and saves them in the offline calibration's
format. Talks to the server over HTTP only.
"""

import asyncio
from datetime import datetime, timezone
import itertools
import json
from pathlib import Path
import re

import httpx

_COEFFICIENT = re.compile(r'^iterserve_cost_model_seconds\{[^}]*term="(\w+)"[^}]*\} (\S+)$', re.MULTILINE)
_ERROR = re.compile(r"^iterserve_cost_model_relative_error\{[^}]*\} (\S+)$", re.MULTILINE)


async def calibrate_server(url: str, out: str, batch_sizes: list[int], prompt_lens: list[int], output_len: int,
                           api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(None, connect=30)) as client:
        version = (await client.get("/version")).raise_for_status().json()
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        if "kv_cache" not in version:
            raise ValueError(f"{url}/version says nothing of its KV cache: is it an iterserve server?")
        for round_index, (batch, length) in enumerate(itertools.product(batch_sizes, prompt_lens)):
            await asyncio.gather(*(
                _complete(client, model, _prompt(round_index, index, length), output_len) for index in range(batch)))
        metrics = (await client.get("/metrics")).raise_for_status().text
    coefficients = {f"{term}_s": float(value) for term, value in _COEFFICIENT.findall(metrics)}
    if len(coefficients) != 4:
        raise ValueError(f"{url}/metrics has no iterserve_cost_model_seconds series")
    errors = _ERROR.findall(metrics)
    saved = {"coefficients": coefficients, "mean_relative_error": float(errors[0]) if errors else None,
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "server": url, "model": model,
             "dtype": version.get("dtype"), "device": version.get("device"), "host": version.get("host"),
             "block_size": version["kv_cache"]["block_size"],
             "kv_bytes_per_block": version["kv_cache"]["bytes_per_block"],
             "kv_cache_dtype": version["kv_cache"].get("dtype")}
    Path(out).write_text(json.dumps(saved, indent=2) + "\n")
    return saved


async def _complete(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0}
    (await client.post("/v1/completions", json=body)).raise_for_status()


def _prompt(round_index: int, index: int, length: int) -> list[int]:
    """Distinct token ids (small ones, valid in any vocabulary of 1,000 or more), so nothing hits
    the prefix cache."""
    start = (round_index * 131 + index * 17) % 997
    return [3 + (start + position * 31) % 997 for position in range(length)]
