"""`iterserve calibrate`: time this engine's steps over a grid of workloads and save the fitted
step cost model (scheduler/cost_model.py) for `serve --cost-model` and `simulate --cost-model`.

  iterserve calibrate --out cpu.json [engine flags as for serve]

For every batch size and prompt length of the grid, that many requests of that prompt
length run to `--output-len` tokens: their prompt steps (chunked as `serve` chunks them)
and their decode steps at a context that grows from the prompt length. A first round of
the same grid is thrown away: it warms the kernels and the allocator, which would
otherwise show as slow early steps.
"""

from datetime import datetime, timezone
import itertools
import time

from engine import host
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from scheduler import SamplingParams, StepCostModel
from scheduler.cost_model import save_cost_model


def calibrate(engine: LLMEngine, batch_sizes: list[int], prompt_lens: list[int], output_len: int) -> StepCostModel:
    grid = [(batch, length) for batch, length in itertools.product(batch_sizes, prompt_lens)
            if length + output_len <= engine.max_model_len]
    if not grid:
        raise ValueError(f"no prompt length of the grid fits max_model_len {engine.max_model_len} with "
                         f"{output_len} output tokens")
    _run_grid(engine, grid[:1], output_len, 0)  # warm-up, measured by nobody
    engine.scheduler.cost_model = model = StepCostModel(min_observed=0)
    _run_grid(engine, grid, output_len, 1)
    return model


def _run_grid(engine: LLMEngine, grid: list[tuple[int, int]], output_len: int, seed: int) -> None:
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for round_index, (batch, length) in enumerate(grid):
        for index in range(batch):
            # Distinct prompts, so nothing is served by the prefix cache.
            start = (seed * 7919 + round_index * 131 + index * 17) % vocab
            engine.add_request([(start + position * 31) % vocab for position in range(length)], params)
        while engine.has_unfinished_requests():
            engine.step()


def main(config: EngineConfig, out: str, batch_sizes: list[int], prompt_lens: list[int], output_len: int) -> int:
    engine = LLMEngine(config)
    started = time.perf_counter()
    model = calibrate(engine, batch_sizes, prompt_lens, output_len)
    coefficients = model.coefficients
    save_cost_model(model, out, date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    model=str(engine.model_path), dtype=str(engine.dtype).removeprefix("torch."),
                    device=str(engine.device), host=host.current().summary(), block_size=config.block_size,
                    kv_bytes_per_block=engine.kv_bytes_per_block, kv_cache_dtype=engine.kv_cache_dtype_name,
                    max_num_seqs=config.max_num_seqs)
    print(f"{model.num_observed} steps in {time.perf_counter() - started:.0f} s; step time = "
          f"{coefficients.base_s * 1000:.2f} ms + {coefficients.prefill_token_s * 1e6:.1f} us per prompt token + "
          f"{coefficients.decode_seq_s * 1e6:.1f} us per decode + {coefficients.context_token_s * 1e9:.2f} ns per "
          f"context token; mean error {model.mean_relative_error:.1%}; wrote {out}")
    return 0
