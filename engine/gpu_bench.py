"""GPU benchmark: the issue-9 workloads on random-weight models built on the spot, beside the physical limit.

  python -m engine.gpu_bench --out gpu.json                      # every workload, both attention backends
  python -m engine.gpu_bench --workloads smollm2-512x128x256 --backends triton --cuda-graphs

Models are Llama-shaped with SmolLM2's tokenizer (its files are small enough to carry; the
embedded GGUF is not) and random weights, written once into `--model-dir`. Each workload
reports output tokens/s, prompt tokens/s, the median pure-decode step time, and the step's
physical limit: bytes read (weights + KV) over measured copy bandwidth plus FLOPs over the
measured bf16 matmul peak. On CUDA a few of those steps also run under the profiler, for the
GPU's kernel time per step and the share of the step the GPU waits on the host (issue 10's
host-work target). `--hf` also times transformers `generate_batch` on the same model.
On a CPU it runs too (`--device cpu --shape tiny`), which is how its logic is tested.
"""

import argparse
from dataclasses import dataclass
import json
from pathlib import Path
import statistics
import time

import torch

from engine import LLM, host
from scheduler import SamplingParams

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "llama3-8b": (4096, 14336, 32, 32, 8),
    "smollm2": (576, 1536, 30, 9, 3),
    "tiny": (64, 128, 2, 4, 2),
}
VOCAB = 49152


@dataclass(frozen=True)
class Workload:
    name: str
    shape: str
    num_requests: int
    prompt_len: int
    output_len: int


WORKLOADS = {w.name: w for w in (
    Workload("smollm2-512x128x256", "smollm2", 512, 128, 256),
    Workload("smollm2-1000x256x128", "smollm2", 1000, 256, 128),  # issue 10: the HTTP run's offline twin
    Workload("8b-512x512x256", "llama3-8b", 512, 512, 256),
    Workload("8b-64x1024x256", "llama3-8b", 64, 1024, 256),
    Workload("8b-256x2048x64", "llama3-8b", 256, 2048, 64),
)}


def build_model(shape: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A random Llama of `shape` saved as a Hugging Face folder (once)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = folder / shape
    if (target / "config.json").exists():
        return target
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


def physical_limit_ms(shape: str, batch: int, context: int, bandwidth: float, peak_flops: float) -> float:
    """One decode step at `batch` x `context`: weights and KV read once, 2 FLOPs per weight per row."""
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    head_dim = hidden // heads
    weights = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                        + 3 * hidden * intermediate) + VOCAB * hidden
    kv_bytes = batch * context * layers * 2 * kv_heads * head_dim * 2
    return 1000 * ((2 * weights + kv_bytes) / bandwidth + 2 * weights * batch / peak_flops)


def measure_device(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read and write, bf16 matmul FLOP/s) on this device."""
    def timed(function, repeats=10):
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    size = 1 << 28 if device.type == "cuda" else 1 << 24
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    bandwidth = 2 * size / timed(lambda: target.copy_(source))
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return bandwidth, 2 * n ** 3 / timed(lambda: a @ a)


def random_prompts(workload: Workload) -> list[list[int]]:
    """The same token ids for every engine: a fixed seed, ids past the special tokens."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (workload.prompt_len,), generator=generator).tolist()
            for _ in range(workload.num_requests)]


def run_workload(path: Path, workload: Workload, device: str, backend: str, cuda_graphs: bool, limits,
                 async_scheduling: bool | None = None) -> dict:
    llm = LLM(str(path), dtype="bfloat16", device=device, max_num_seqs=256, attention_backend=backend,
              cuda_graphs=cuda_graphs, kv_cache_memory=int(limits["kv_cache_bytes"]),
              async_scheduling=async_scheduling)
    prompts = random_prompts(workload)
    params = SamplingParams(max_tokens=workload.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine, decode_steps, device_steps = llm.engine, [], []
    step, on_cuda = engine.step, engine.device.type == "cuda"
    window: list = []  # [kernel_timer, steps taken] while PROFILED_STEPS steps run under it

    def timed_step():  # pure-decode steps at the full batch: the figure the limit is computed for
        full = len(engine.scheduler.running) >= min(256, workload.num_requests)
        # Once, a few consecutive steps under the profiler, for the GPU's busy time per step
        # (issue 10's host share): consecutive, because under async scheduling a step's kernels
        # run while the next call queues its successor. Their wall time, slowed by the
        # profiler, is not counted.
        if on_cuda and full and len(decode_steps) >= 8 and not window and not device_steps:
            window[:] = [kernel_timer(engine.device).__enter__(), 0]
        start = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - start
        if window:
            window[1] += 1
            if window[1] == PROFILED_STEPS:
                timer = window[0]
                timer.__exit__(None, None, None)
                busy = timer.busy_ms()
                device_steps.append(busy / PROFILED_STEPS if busy is not None else None)
                window.clear()
        elif outputs and all(o.times.num_output_tokens > 1 for o in outputs) and full:
            # Synchronous steps end with their tokens read back; async ones with the step
            # before's, so their period is the step time the batch sees.
            decode_steps.append(seconds)
        return outputs

    engine.step = timed_step
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(o.token_ids) for o in outputs)
    batch = min(256, workload.num_requests)
    step_ms = 1000 * statistics.median(decode_steps) if decode_steps else None
    limit_ms = physical_limit_ms(workload.shape, batch, workload.prompt_len + workload.output_len // 2,
                                 limits["bandwidth"], limits["peak_flops"])
    device_ms = device_steps[0] if device_steps else None
    return {"workload": workload.name, "backend": engine.paths["attention"], "cuda_graphs": cuda_graphs,
            "async_scheduling": engine.async_scheduling,
            "seconds": round(seconds, 2), "output_tok_per_s": round(output_tokens / seconds, 1),
            "prompt_tok_per_s": round(workload.num_requests * workload.prompt_len / seconds, 1),
            "decode_step_ms_median": step_ms and round(step_ms, 2), "decode_batch": batch,
            "decode_step_limit_ms": round(limit_ms, 2),
            # The GPU's kernel time in such a step, and the share of the step it is idle for (host work).
            "decode_step_device_ms": device_ms and round(device_ms, 2),
            "decode_step_host_share": round(1 - device_ms / step_ms, 3) if device_ms and step_ms else None}


PROFILED_STEPS = 3


class kernel_timer:
    """`with kernel_timer(device) as timer: ...`, then `timer.busy_ms()`: the time the device's
    kernels and copies ran inside the block (on a CPU, the operators' own CPU time). A profiler
    that fails leaves the block to run unprofiled and `busy_ms` None: a benchmark's one device
    call must not be lost to it."""

    def __init__(self, device: torch.device):
        from torch.profiler import ProfilerActivity, profile

        self.device = device
        on_cuda = device.type == "cuda"
        self._profile = profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU])
        self._attribute = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        self._failed: Exception | None = None

    def __enter__(self) -> "kernel_timer":
        try:
            self._profile.__enter__()
        except Exception as error:  # noqa: BLE001 - see the class docstring
            self._failed = error
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self._failed is None:
            try:
                self._profile.__exit__(*exc_info)
            except Exception as error:  # noqa: BLE001
                self._failed = error

    def busy_ms(self) -> float | None:
        if self._failed is not None:
            return None
        return sum(getattr(event, self._attribute) for event in self._profile.key_averages()) / 1000


def run_hf(path: Path, workload: Workload, device: str) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    prompts = random_prompts(workload)
    config = GenerationConfig(max_new_tokens=workload.output_len, do_sample=False, eos_token_id=-1)
    try:
        start = time.perf_counter()
        outputs = model.generate_batch(prompts, generation_config=config)
        seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - the peer may not run this shape; record why
        return {"workload": workload.name, "engine": "transformers generate_batch", "error": repr(error)[:300]}
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"workload": workload.name, "engine": "transformers generate_batch", "seconds": round(seconds, 2),
            "output_tok_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--backends", default="torch,triton", help="attention backends to compare")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="auto: the engine's default (on for CUDA)")
    parser.add_argument("--hf", action="store_true", help="also run transformers generate_batch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="run every workload on this shape instead")
    parser.add_argument("--num-requests", type=int, help="override each workload's request count")
    parser.add_argument("--kv-cache-gib", type=float, default=20.0)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/iterserve-gpu-models"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder with SmolLM2's tokenizer files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from engine.embedded_model import default_model_path
    tokenizer_dir = args.tokenizer or default_model_path()
    device = torch.device(args.device)
    bandwidth, peak_flops = measure_device(device)
    limits = {"bandwidth": bandwidth, "peak_flops": peak_flops, "kv_cache_bytes": args.kv_cache_gib * 2 ** 30}
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host.current().summary(),
              "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1), "bf16_matmul_tflop_per_s": round(peak_flops / 1e12, 3),
              "results": []}
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        if args.shape or args.num_requests:
            workload = Workload(name, args.shape or workload.shape, args.num_requests or workload.num_requests,
                                workload.prompt_len, workload.output_len)
        path = build_model(workload.shape, args.model_dir, tokenizer_dir)
        async_scheduling = {"auto": None, "on": True, "off": False}[args.async_scheduling]
        runs = [lambda b=b: run_workload(path, workload, args.device, b, args.cuda_graphs, limits, async_scheduling)
                for b in args.backends.split(",")]
        if args.hf:
            runs.append(lambda: run_hf(path, workload, args.device))
        for run in runs:
            try:
                row = run()
            except Exception as error:  # noqa: BLE001 - one failing run must not lose the others
                row = {"workload": name, "error": repr(error)[:300]}
            print(json.dumps(row), flush=True)
            report["results"].append(row)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
