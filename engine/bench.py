"""Offline throughput: iterserve against transformers on this machine, as output tokens per second.

Cases, each timed after a short warm-up and run once per dtype:
  iterserve-offline-256     the shared `offline-256.jsonl` trace: prompts of exactly `prompt_len` token ids
                            (fixed-seed draws from the ordinary vocabulary), exactly `output_len` tokens out
  iterserve-64x128          64 requests x 128 tokens, the vLLM peer's prompts, greedy, EOS ignored
  hf-static-64x128          transformers `generate`, static batches of 8, left padding, min_new_tokens =
                            max_new_tokens (which masks EOS rather than ignoring it: same work, other tokens)
  hf-generate-batch-64x128  transformers `generate_batch` (its continuous batching); an error is recorded, not raised
`--profile` splits the iterserve 64x128 run into matmuls, attention and the rest, and measures the
matmul ceiling at this model's shapes. Run: `python -m engine.bench --out bench-results/offline.json`.

Every dtype this host runs is measured (float32 and bfloat16 on any CPU). Where the CPU has no
native bfloat16 (engine/host.py) that dtype is emulated, several times slower than float32: its
rows say `"emulated": true`, and only the two 64x128 cases that make its ratio run, unless
`--full-emulated`. A case that fails is recorded with its error and the run goes on, so the report
is always written.
"""

import argparse
import gc
import json
import os
from pathlib import Path
import random
import subprocess
import time

import torch
from torch import nn

import engine.model
from engine import LLM, host
from engine.embedded_model import default_model_path
from engine.loader import DTYPES, KV_CACHE_DTYPES, resolve_kv_cache_dtype
from scheduler import SamplingParams

CASES = ("iterserve-offline-256", "iterserve-64x128", "hf-static-64x128", "hf-generate-batch-64x128")
EMULATED_CASES = ("iterserve-64x128", "hf-static-64x128")  # enough for the ratio to transformers
NUM_REQUESTS, OUTPUT_TOKENS, STATIC_BATCH = 64, 128, 8
WARMUP_REQUESTS, WARMUP_TOKENS = 4, 16
PEER_PROMPTS = [f"Write a short story number {i} about a robot learning to paint." for i in range(NUM_REQUESTS)]


def result(case: str, dtype: str, num_requests: int, output_tokens: int, seconds: float, **extra) -> dict:
    return {"case": case, "dtype": dtype, "requests": num_requests, "output_tokens": output_tokens,
            "seconds": round(seconds, 3), "output_tok_per_s": round(output_tokens / seconds, 1), **extra}


def trace_prompts(path: Path, tokenizer, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output_len) per line; ids avoid special and added tokens."""
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in added]
    rng = random.Random(seed)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [([rng.choice(ordinary) for _ in range(row["prompt_len"])], row["output_len"]) for row in rows]


# -- iterserve --------------------------------------------------------------------------

def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run_iterserve(llm: LLM, case: str, dtype: str, workloads: Path) -> tuple[dict, list[list[int]]]:
    if case == "iterserve-offline-256":
        trace = trace_prompts(workloads / "offline-256.jsonl", llm.tokenizer)
        prompts, params = [p for p, _ in trace], [greedy(n) for _, n in trace]
    else:
        prompts, params = PEER_PROMPTS, [greedy(OUTPUT_TOKENS)] * NUM_REQUESTS
    start = time.perf_counter()
    tokens = [list(o.token_ids) for o in llm.generate(prompts, params)]
    seconds = time.perf_counter() - start
    expected = sum(p.max_tokens for p in params)
    return result(case, dtype, len(prompts), sum(map(len, tokens)), seconds, expected_tokens=expected), tokens


# -- transformers -------------------------------------------------------------------------

@torch.inference_mode()
def hf_static(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    tokens = []
    for start in range(0, len(prompts), STATIC_BATCH):
        batch = tokenizer(prompts[start:start + STATIC_BATCH], return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        tokens += out[:, batch["input_ids"].shape[1]:].tolist()
    return tokens


def hf_generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1)  # -1: EOS ignored
    outputs = model.generate_batch([tokenizer.encode(p) for p in prompts], generation_config=config)
    errors = [o.error for o in outputs.values() if o.error]
    if errors or len(outputs) != len(prompts):
        raise RuntimeError(f"{len(outputs)}/{len(prompts)} outputs; errors: {errors[:3]}")
    return [o.generated_tokens for o in outputs.values()]


def run_hf(case: str, dtype: str, model_path: Path) -> tuple[dict, list[list[int]] | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    generate = hf_static if case == "hf-static-64x128" else hf_generate_batch
    try:  # not under inference_mode: generate_batch steps in its own thread, which would not inherit it
        generate(model, tokenizer, PEER_PROMPTS[:WARMUP_REQUESTS], WARMUP_TOKENS)
        start = time.perf_counter()
        tokens = generate(model, tokenizer, PEER_PROMPTS, OUTPUT_TOKENS)
        seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - generate_batch may not run on CPU; record why and go on
        return {"case": case, "dtype": dtype, "error": f"{type(error).__name__}: {error}"}, None
    return result(case, dtype, NUM_REQUESTS, sum(map(len, tokens)), seconds), tokens


# -- profile ------------------------------------------------------------------------------

class Timers:
    """Wall seconds per label; CPU ops are synchronous, so a timer around a call measures it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def wrap(self, label: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            value = function(*args, **kwargs)
            self.add(label, time.perf_counter() - start)
            return value
        return timed


def profile_step(llm: LLM) -> dict:
    """Where a step of the 64x128 run goes; the parts add up to the step's wall time."""
    timers, llm_engine = Timers(), llm.engine
    runner, model = llm_engine.runner, llm_engine.runner.model
    starts: dict[nn.Module, float] = {}
    labels = {m: "layer matmul" for m in model.modules() if isinstance(m, (nn.Linear, engine.model.PackedLinear))}
    labels.update({model.lm_head: "lm_head", model: "model forward"})
    hooks = [m.register_forward_pre_hook(lambda m, _: starts.__setitem__(m, time.perf_counter())) for m in labels]
    hooks += [m.register_forward_hook(lambda m, _i, _o: timers.add(labels[m], time.perf_counter() - starts[m]))
              for m in labels]
    # model.py calls paged_attention by the name it imported, so that name is the one to wrap.
    original_attention = engine.model.paged_attention
    engine.model.paged_attention = timers.wrap("attention", original_attention)
    llm_engine.step = timers.wrap("step", llm_engine.step)
    runner.execute = timers.wrap("execute", runner.execute)
    try:
        for prompt in PEER_PROMPTS:
            llm_engine.add_request(prompt, greedy(OUTPUT_TOKENS))
        num_steps = 0
        while llm_engine.has_unfinished_requests():
            llm_engine.step()
            num_steps += 1
    finally:
        engine.model.paged_attention = original_attention
        del llm_engine.step, runner.execute  # the instance attributes go; the methods show through again
        for hook in hooks:
            hook.remove()
    s = timers.seconds
    parts = {
        "matmul (Linear incl. lm_head)": s["layer matmul"] + s["lm_head"],
        "attention (paged_attention)": s["attention"],
        "other model ops (norms, rope, embedding, silu)": s["model forward"] - s["layer matmul"] - s["attention"],
        "runner outside the model (batch, final norm, sampling)": s["execute"] - s["model forward"] - s["lm_head"],
        "scheduler and outputs (detokenize, stops)": s["step"] - s["execute"],
    }
    return {"steps": num_steps, "step_s": round(s["step"], 3),
            "output_tok_per_s": round(NUM_REQUESTS * OUTPUT_TOKENS / s["step"], 1),
            "lm_head_ms_per_step": round(1000 * s["lm_head"] / num_steps, 2),
            "ms_per_step": {k: round(1000 * v / num_steps, 2) for k, v in parts.items()},
            "share": {k: round(v / s["step"], 3) for k, v in parts.items()}}


def matmul_ceiling(model_path: Path, dtype: str, rows: int = NUM_REQUESTS, min_seconds: float = 0.3) -> dict:
    """GFLOP/s of `F.linear` at this model's shapes, and the decode tokens/s if matmuls were all there is."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path)
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    # (name, in, out, times per token): the fused projections as engine/model.py builds them.
    shapes = [("qkv_proj", hidden, qkv, config.num_hidden_layers),
              ("o_proj", config.num_attention_heads * head_dim, hidden, config.num_hidden_layers),
              ("gate_up_proj", hidden, 2 * inter, config.num_hidden_layers),
              ("down_proj", inter, hidden, config.num_hidden_layers),
              ("lm_head", hidden, config.vocab_size, 1)]
    torch_dtype, gflops, seconds_per_token = getattr(torch, dtype), {}, 0.0
    for name, k, n, times in shapes:
        x, weight = torch.randn(rows, k, dtype=torch_dtype), torch.randn(n, k, dtype=torch_dtype)
        torch.nn.functional.linear(x, weight)
        iterations, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            torch.nn.functional.linear(x, weight)
            iterations += 1
        gflops[f"{name} [{rows}x{k}]@[{k}x{n}]"] = round(2 * rows * k * n * iterations / elapsed / 1e9, 1)
        seconds_per_token += times * elapsed / iterations / rows
    flops_per_token = sum(2 * k * n * times for _, k, n, times in shapes)  # 2 x weights touched per token
    return {"dtype": dtype, "gflop_per_s": gflops, "model_gflop_per_token": round(flops_per_token / 1e9, 4),
            "effective_gflop_per_s": round(flops_per_token / seconds_per_token / 1e9, 1),
            "matmul_only_tok_per_s": round(1 / seconds_per_token, 1)}


# -- the run ------------------------------------------------------------------------------

class Report:
    """Results printed as they come and rewritten to `--out` after each one, so a killed run keeps them."""

    def __init__(self, out: Path | None):
        self.out, self.results, self.profiles, self.engines = out, [], {}, {}
        self.machine = {"cpu": host.current().cpu.model, "host": host.current().summary(), "nproc": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "revision": git_revision()}

    def add(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        self.results.append(row)
        self.save()

    def save(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": self.machine,
                                            "engines": self.engines, "results": self.results,
                                            "profile": self.profiles}, indent=2) + "\n")


def is_emulated(dtype: str) -> bool:
    """bfloat16 on a CPU without AVX512-BF16 or AMX: every matmul converts, several times slower."""
    machine = host.current()
    return dtype == "bfloat16" and machine.cuda is None and not machine.cpu.native_bfloat16


def marked(row: dict) -> dict:
    """The row, saying so when its dtype is emulated here."""
    return row | ({"emulated": True} if is_emulated(row["dtype"]) else {})


def failed(case: str, dtype: str, error: Exception) -> dict:
    return marked({"case": case, "dtype": dtype, "error": f"{type(error).__name__}: {error}"})


def measured(report: "Report", case: str, dtype: str, run) -> list[list[int]] | None:
    """Runs one case; a failure becomes a row with its error, never the end of the report."""
    try:
        row, tokens = run()
    except Exception as error:  # noqa: BLE001 - record why, go on with the next case
        report.add(failed(case, dtype, error))
        return None
    report.add(marked(row))
    return tokens


def run_dtype(dtype: str, cases: list[str], args, report: Report) -> None:
    tokens, model_path = {}, default_model_path()
    if is_emulated(dtype) and not args.full_emulated:
        skipped = [c for c in cases if c not in EMULATED_CASES]
        cases = [c for c in cases if c in EMULATED_CASES]
        for case in skipped:
            report.add(marked({"case": case, "dtype": dtype,
                               "skipped": "bfloat16 is emulated on this CPU; --full-emulated runs it"}))
    iterserve_cases = [c for c in cases if c.startswith("iterserve")]
    if iterserve_cases or args.profile:
        knobs = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens)) if v}
        try:
            resolve_kv_cache_dtype(args.kv_cache_dtype, DTYPES[dtype])
            knobs["kv_cache_dtype"] = args.kv_cache_dtype
        except ValueError:  # a 16-bit model keeps its own 16 bits rather than the other format's
            pass
        try:
            llm = LLM(str(model_path), dtype=dtype, **knobs)
            llm.generate(PEER_PROMPTS[:WARMUP_REQUESTS], greedy(WARMUP_TOKENS))
            report.engines[dtype] = llm.engine.paths | {"kv_cache_dtype": llm.engine.kv_cache_dtype_name}
        except Exception as error:  # noqa: BLE001 - the engine cannot run this dtype here: say so, go on
            for case in iterserve_cases:
                report.add(failed(case, dtype, error))
            iterserve_cases, llm = [], None
        for case in iterserve_cases:
            tokens[case] = measured(report, case, dtype, lambda: run_iterserve(llm, case, dtype, args.workloads))
        if args.profile and llm is not None:
            try:
                report.profiles[dtype] = {"step": profile_step(llm),
                                          "matmul_ceiling": matmul_ceiling(model_path, dtype)}
            except Exception as error:  # noqa: BLE001
                report.profiles[dtype] = {"error": f"{type(error).__name__}: {error}"}
            report.save()
        del llm
        gc.collect()
    for case in [c for c in cases if c.startswith("hf")]:
        tokens[case] = measured(report, case, dtype, lambda: run_hf(case, dtype, model_path))
        gc.collect()
    # Greedy agreement, a cheap check that like is compared with like. Against generate_batch, not the
    # static case: min_new_tokens there masks EOS, which these raw prompts pick as their first token.
    if tokens.get("hf-generate-batch-64x128") and tokens.get("iterserve-64x128"):
        row = next(r for r in report.results if r["case"] == "iterserve-64x128" and r["dtype"] == dtype)
        pairs = zip(tokens["iterserve-64x128"], tokens["hf-generate-batch-64x128"])
        row["same_tokens_as_generate_batch"] = sum(a == b for a, b in pairs)
        report.save()


def print_table(results: list[dict]) -> None:
    static = {r["dtype"]: r.get("output_tok_per_s") for r in results if r["case"] == "hf-static-64x128"}
    print(f"\n{'case':<26}{'dtype':<10}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'/hf-static':>11}")
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"{r['case']:<26}{r['dtype']:<10}  {'error: ' + r['error'][:120] if 'error' in r else r['skipped']}")
            continue
        ratio = f"{r['output_tok_per_s'] / static[r['dtype']]:.2f}" if static.get(r["dtype"]) else "-"
        print(f"{r['case']:<26}{r['dtype']:<10}{r['requests']:>9}{r['output_tokens']:>8}"
              f"{r['seconds']:>9.1f}{r['output_tok_per_s']:>8.1f}{ratio:>11}{'  (emulated)' if r.get('emulated') else ''}")
        if "same_tokens_as_generate_batch" in r:
            print(f"    greedy sequences identical to generate_batch: {r['same_tokens_as_generate_batch']}/{r['requests']}")


def git_revision() -> str:
    # The engine changes under people's hands: record which code was measured.
    run = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                         capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="bfloat16 is emulated on CPUs without native bf16")
    parser.add_argument("--full-emulated", action="store_true", help="run every case in an emulated dtype too")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--workloads", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "workloads")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES],
                        help="bfloat16 / float16 apply to the float32 runs only; fp8_e5m2 to all")
    parser.add_argument("--profile", action="store_true", help="also break down the iterserve 64x128 step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = [c for c in args.only.split(",") if c]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")

    report = Report(args.out)
    for dtype in args.dtypes.split(","):
        run_dtype(dtype, cases, args, report)
    print_table(report.results)
    for dtype, profile in report.profiles.items():
        print(f"\n{dtype} step breakdown and matmul ceiling:\n{json.dumps(profile, indent=2)}")


if __name__ == "__main__":
    main()
