"""The engine's flags, shared by every subcommand that builds or simulates an engine, and the
EngineConfig they make."""

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, in three groups of `--help`."""
    add_model_arguments(parser)
    add_scheduling_arguments(parser)
    add_device_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and KV cache")
    group.add_argument("--model", default=None, help="Hugging Face model folder (default: embedded SmolLM2-135M)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--kv-cache-memory", default="2GiB", help="bytes for the KV cache, e.g. 2GiB")
    group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "fp8_e5m2"],
                        help="the KV cache's element type: auto is the model's; a float32 model's keys and values "
                             "in bfloat16 or float16, or any model's in fp8_e5m2, take less memory and fewer "
                             "attention reads, at some precision")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    # On CPU a swap out and back costs 1-7% of recomputing the same context, from 16 tokens
    # up (BENCHMARKS.md, issue 11: python -m engine.swap_cost), so every victim that fits is swapped.
    group.add_argument("--swap-space", default="1GiB", help="host memory for preempted requests' KV "
                        "(default 1GiB; 0: preempted requests are recomputed)")
    group.add_argument("--swap-threshold-tokens", type=int, default=0, metavar="N",
                        help="victims with fewer than N computed tokens are recomputed instead of swapped")


def add_scheduling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduling")
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--long-prefill-token-threshold", type=int, default=256, metavar="N",
                        help="with chunked prefill, at most N tokens of one prompt per step, so short "
                             "prompts start beside a long one (0: no cap; default 256)")
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "sjf", "fair", "slo"],
                        help="the order of waiting requests: first come; lower `priority` first, preempting; "
                             "shortest remaining work first; fair share between tenants (VTC); or earliest TTFT "
                             "deadline first, with TTFT and TPOT targets (slo)")
    group.add_argument("--priority-aging-s", type=float, default=60.0, metavar="S",
                        help="priority and sjf: a waiting request gains one level per S seconds, so nothing "
                             "starves; slo: a request without a TTFT target is due S seconds after it came "
                             "(0: no aging)")
    group.add_argument("--slo-infeasible", default="reject", choices=["reject", "best-effort"],
                        help="slo: a request whose TTFT target cannot be met at the measured step times gets "
                             "429 (reject), or runs without its target after those that can make theirs")
    group.add_argument("--cost-model", default=None, metavar="FILE",
                        help="start the step cost model from this calibration (iterserve calibrate) instead "
                             "of measuring from nothing")
    group.add_argument("--batching", default="continuous", choices=["continuous", "dynamic", "static"],
                        help="continuous admits every step; static and dynamic run padded batches to completion")
    group.add_argument("--static-batch-size", type=int, default=None,
                        help="requests per static or dynamic batch (default: --max-num-seqs)")
    group.add_argument("--batch-timeout-s", type=float, default=0.5,
                        help="how long a static batch, or a dynamic bucket's oldest request, waits to fill")
    group.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="schedule and queue each step while the one before runs on the device, its tokens "
                             "read back a step later (auto: on for CUDA; on CPU a step runs as it is queued, so "
                             "there is nothing to overlap)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--cuda-graphs", action="store_true", help="capture decode steps as CUDA graphs")
    group.add_argument("--cuda-graph-sizes", default=None, metavar="SIZES",
                        help="the decode batch sizes to capture (implies --cuda-graphs), comma-separated, or auto: "
                             "planned from a simulated run of --trace so that its decode steps pad the fewest rows "
                             "(default: powers of two up to --max-num-seqs)")
    group.add_argument("--max-cuda-graph-sizes", type=int, default=9, metavar="K",
                        help="--cuda-graph-sizes auto: at most K sizes (default 9, as many as the powers of two)")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "cpu-kernel", "torch"],
                        help="auto: the C++ kernel on CPU, torch on CUDA; triton: our Triton kernels (on CPU only "
                             "under TRITON_INTERPRET=1, for checking); torch: the gather reference")
    group.add_argument("--num-threads", type=int, default=None,
                        help="torch threads on CPU (default: torch's choice; 1 helps on a busy machine)")


def engine_config(args: argparse.Namespace):
    from engine.config import EngineConfig, parse_size

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=parse_size(args.kv_cache_memory),
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        enable_prefix_caching=args.enable_prefix_caching,
        swap_space=parse_size(args.swap_space),
        swap_threshold_tokens=args.swap_threshold_tokens,
        policy=args.scheduling_policy,
        priority_aging_s=args.priority_aging_s or None,
        slo_infeasible=args.slo_infeasible,
        cost_model=args.cost_model,
        batching=args.batching,
        static_batch_size=args.static_batch_size,
        batch_timeout_s=args.batch_timeout_s,
        seed=getattr(args, "seed", None) or 0,
        cuda_graphs=args.cuda_graphs or args.cuda_graph_sizes is not None,
        cuda_graph_sizes=parse_cuda_graph_sizes(args.cuda_graph_sizes),
        num_threads=args.num_threads,
        attention_backend=args.attention_backend,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )


def parse_cuda_graph_sizes(text: str | None) -> tuple[int, ...] | None:
    """None for the default and for auto (which serve plans from its trace)."""
    if text is None or text == "auto":
        return None
    try:
        sizes = tuple(sorted({int(size) for size in text.split(",") if size.strip()}))
    except ValueError:
        raise ValueError(f"--cuda-graph-sizes takes auto or batch sizes separated by commas, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--cuda-graph-sizes must be positive, got {text!r}")
    return sizes
