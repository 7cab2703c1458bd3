"""How long one step's sampling takes on this CPU: torch's draw against the C++ kernel's, per
setting, on random logits shaped as a step's (rows x vocabulary, in the model's dtype).

    python -m engine.sampler_bench [--rows 64] [--vocab 49152] [--dtype bfloat16] [--isa avx2]
"""

import argparse
import json
import time

import torch

from engine import cpu_kernels
from engine.sampler import Sampler
from scheduler import Request, SamplingParams

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 1": {"temperature": 1.0},
    "temperature 0.7, top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50": {"temperature": 1.0, "top_k": 50},
    "min-p 0.05": {"temperature": 1.0, "min_p": 0.05},
    "temperature 1, 5 logprobs": {"temperature": 1.0, "logprobs": 5},
}


def best_ms(sampler: Sampler, logits: torch.Tensor, requests: list[Request], repeats: int) -> float:
    sampler.sample(logits, requests)  # the first call pays for allocations the rest reuse
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.sample(logits, requests)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def run(rows: int, vocab: int, dtype: str, isa: str | None, repeats: int) -> list[dict]:
    kernel = cpu_kernels.load(isa)
    if kernel is None:
        raise SystemExit("the C++ kernels cannot be built here: nothing to compare")
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(getattr(torch, dtype))
    results = []
    for name, params in SETTINGS.items():
        requests = [Request(f"r{i}", [1], SamplingParams(max_tokens=1, **params)) for i in range(rows)]
        results.append({"setting": name, "torch_ms": best_ms(Sampler(), logits, requests, repeats),
                        "kernel_ms": best_ms(Sampler(kernel=kernel), logits, requests, repeats)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--isa", help="a kernel build (engine/cpu_kernels.py); the best this CPU runs by default")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    build = args.isa or cpu_kernels.runnable_builds()[0].isa
    print(f"{args.rows} rows x {args.vocab}, {args.dtype}, {build} build, {torch.get_num_threads()} threads; "
          "best of", args.repeats)
    for row in run(args.rows, args.vocab, args.dtype, args.isa, args.repeats):
        print(json.dumps({key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()}))


if __name__ == "__main__":
    main()
