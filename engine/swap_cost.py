"""What a preempted request costs to keep by swap and to recompute, on this host: the measurement
behind `--swap-threshold-tokens`.

  python -m engine.swap_cost [--model PATH] [--dtype auto] [--device auto] [--out FILE]

For contexts of several lengths it times copying the context's KV blocks out to the host
pool and back (`ModelRunner.swap_blocks`, both ways) against computing the same tokens
again as one prefill chunk (what a recomputed request costs before it can decode again),
and reports the shortest context from which swapping is cheaper.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from engine.config import EngineConfig, parse_size
from engine.llm_engine import LLMEngine
from scheduler import Request, SamplingParams
from scheduler import ScheduledRequest, SchedulerOutput

CONTEXTS = (16, 64, 256, 1024)


def _median_s(function, repeats: int = 5) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(engine: LLMEngine, context: int) -> dict:
    runner, block_size = engine.runner, engine.kv_cache.block_size
    num_blocks = -(-context // block_size)
    blocks = list(range(num_blocks))
    pairs = list(zip(blocks, blocks))
    swap_s = _median_s(lambda: runner.swap_blocks(pairs, pairs))
    request = Request("probe", [1 + index % 1000 for index in range(context)], SamplingParams(max_tokens=1))
    plan = SchedulerOutput(scheduled=[ScheduledRequest(request, context, blocks)])
    recompute_s = _median_s(lambda: runner.execute(plan))
    return {"context_tokens": context, "blocks": num_blocks, "swap_out_and_in_ms": 1000 * swap_s,
            "recompute_ms": 1000 * recompute_s, "swap_is_cheaper": swap_s < recompute_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.swap_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    blocks_needed = -(-max(CONTEXTS) // 16)
    # 4 MiB a block is more than a 16-token block of any model we serve (Llama-3-8B: 2 MiB).
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                    swap_space=blocks_needed * parse_size("4MiB")))
    rows = [measure(engine, context) for context in CONTEXTS if context < engine.max_model_len]
    cheaper = [row["context_tokens"] for row in rows if row["swap_is_cheaper"]]
    report = {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
              "kv_bytes_per_block": engine.kv_bytes_per_block, "rows": rows,
              "shortest_context_where_swap_is_cheaper": min(cheaper) if cheaper else None}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
