"""Host work of one step's inputs: ModelRunner.prepare at a full decode batch, per attention backend.

  python -m engine.prepare_bench                      # batch 256, context ~540, every backend here
  python -m engine.prepare_bench --batch 64 --context 1024 --chunks 2

The model never runs: a tiny random Llama gives the runner its shapes, and the requests are
placed in the scheduler's state as if their prompts had been computed, so the figure is the
Python and copy work that stands between the scheduler and the device (on a GPU, what the
device waits on unless it is overlapped). Triton's backend is timed on a CPU too: only its
inputs are built, no kernel runs.
"""

import argparse
import json
import os
from pathlib import Path
import statistics
import time

import torch

from engine.attention import ATTENTION_BACKENDS
from engine.model_runner import ModelRunner
from kvcache import KVCacheManager
from scheduler import Request, SamplingParams, ScheduledRequest, SchedulerOutput

BLOCK_SIZE = 16
VOCAB = 512


def tiny_model():
    from engine.model import LlamaForCausalLM, ModelArgs

    args = ModelArgs(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=8192,
                     rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, qkv_bias=False, o_bias=False)
    return LlamaForCausalLM(args, max_positions=8192).to(torch.bfloat16)


def step(batch: int, context: int, chunks: int, chunk_len: int, kv_cache: KVCacheManager) -> SchedulerOutput:
    """`batch` decodes at contexts spread around `context`, and `chunks` prompt chunks of
    `chunk_len` tokens over a cached prefix of `context` tokens."""
    generator = torch.Generator().manual_seed(0)
    scheduled = []
    for index in range(batch + chunks):
        is_chunk = index >= batch
        length = context + (index % 64) - 32 if not is_chunk else context + chunk_len
        prompt = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        request = Request(f"r{index}", prompt, SamplingParams(max_tokens=16), eos_token_ids=(2,))
        num_new = chunk_len if is_chunk else 1
        kv_cache.allocate_slots(request, length)
        request.num_computed_tokens = length - num_new
        scheduled.append(ScheduledRequest(request, num_new, kv_cache.block_ids(request.request_id)))
    return SchedulerOutput(scheduled=scheduled)


def time_prepare(runner: ModelRunner, output: SchedulerOutput, repeats: int) -> float:
    runner.prepare(output)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.prepare(output)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=540)
    parser.add_argument("--chunks", type=int, default=0, help="prompt chunks beside the decodes")
    parser.add_argument("--chunk-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1" if args.device == "cpu" else "0")
    device = torch.device(args.device)
    model = tiny_model().to(device)
    num_blocks = (args.batch + args.chunks) * (-(-(args.context + args.chunk_len + 64) // BLOCK_SIZE))
    rows = []
    for backend in [b for b in ATTENTION_BACKENDS if b != "auto"]:
        try:
            runner = ModelRunner(model, num_blocks, BLOCK_SIZE, device, backend)
        except ValueError as error:  # not on this host (no compiler, no triton)
            rows.append({"backend": backend, "skipped": str(error)})
            continue
        output = step(args.batch, args.context, args.chunks, args.chunk_len,
                      KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False))
        seconds = time_prepare(runner, output, args.repeats)
        rows.append({"backend": backend, "batch": args.batch, "context": args.context, "chunks": args.chunks,
                     "prepare_ms_median": round(1000 * seconds, 3)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
