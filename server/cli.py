"""`iterserve`: one command, with subcommands."""

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
import sys


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default="2GiB", help="bytes for the KV cache, e.g. 2GiB")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=256, metavar="N",
                        help="with chunked prefill, at most N tokens of one prompt per step, so short "
                             "prompts start beside a long one (0: no cap; default 256)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    # On CPU a swap out and back costs 1-7% of recomputing the same context, from 16 tokens
    # up (BENCHMARKS.md, issue 11: python -m engine.swap_cost), so every victim that fits is swapped.
    parser.add_argument("--swap-space", default="1GiB", help="host memory for preempted requests' KV "
                        "(default 1GiB; 0: preempted requests are recomputed)")
    parser.add_argument("--swap-threshold-tokens", type=int, default=0, metavar="N",
                        help="victims with fewer than N computed tokens are recomputed instead of swapped")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "sjf", "fair", "slo"],
                        help="the order of waiting requests: first come; lower `priority` first, preempting; "
                             "shortest remaining work first; fair share between tenants (VTC); or earliest TTFT "
                             "deadline first, with TTFT and TPOT targets (slo)")
    parser.add_argument("--priority-aging-s", type=float, default=60.0, metavar="S",
                        help="priority and sjf: a waiting request gains one level per S seconds, so nothing "
                             "starves; slo: a request without a TTFT target is due S seconds after it came "
                             "(0: no aging)")
    parser.add_argument("--slo-infeasible", default="reject", choices=["reject", "best-effort"],
                        help="slo: a request whose TTFT target cannot be met at the measured step times gets "
                             "429 (reject), or runs without its target after those that can make theirs")
    parser.add_argument("--cost-model", default=None, metavar="FILE",
                        help="start the step cost model from this calibration (iterserve calibrate) instead "
                             "of measuring from nothing")
    parser.add_argument("--batching", default="continuous", choices=["continuous", "dynamic", "static"],
                        help="continuous admits every step; static and dynamic run padded batches to completion")
    parser.add_argument("--static-batch-size", type=int, default=None,
                        help="requests per static or dynamic batch (default: --max-num-seqs)")
    parser.add_argument("--batch-timeout-s", type=float, default=0.5,
                        help="how long a static batch, or a dynamic bucket's oldest request, waits to fill")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture decode steps as CUDA graphs")
    parser.add_argument("--cuda-graph-sizes", default=None, metavar="SIZES",
                        help="the decode batch sizes to capture (implies --cuda-graphs), comma-separated, or auto: "
                             "planned from a simulated run of --trace so that its decode steps pad the fewest rows "
                             "(default: powers of two up to --max-num-seqs)")
    parser.add_argument("--max-cuda-graph-sizes", type=int, default=9, metavar="K",
                        help="--cuda-graph-sizes auto: at most K sizes (default 9, as many as the powers of two)")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "cpu-kernel", "torch"],
                        help="auto: the C++ kernel on CPU, torch on CUDA; triton: our Triton kernels (on CPU only "
                             "under TRITON_INTERPRET=1, for checking); torch: the gather reference")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads on CPU (default: torch's choice; 1 helps on a busy machine)")


def engine_config(args: argparse.Namespace):
    from engine.config import EngineConfig, parse_size

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
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


def planned_cuda_graph_sizes(args: argparse.Namespace, config, tenants):
    """serve --cuda-graph-sizes auto: the sizes planned from --trace, on this machine's GPU
    (its roofline preset) or the calibration given with --cost-model."""
    from engine import host
    from loadtest.simulate import Machine, cuda_graph_sizes_for_trace
    from scheduler.roofline import hardware_preset

    if not args.trace:
        raise ValueError("--cuda-graph-sizes auto plans from a workload: give it --trace FILE")
    if args.cost_model:
        machine = Machine.calibrated(args.cost_model, config)
    else:
        cuda = host.current().cuda
        machine = Machine.roofline(hardware_preset(cuda.name if cuda else ""), config.model, config)
    sizes = cuda_graph_sizes_for_trace(args.trace, config, tenants, machine, args.max_cuda_graph_sizes)
    if not sizes:
        raise ValueError(f"{args.trace}: its simulated run has no pure decode steps to plan CUDA graph sizes from")
    logging.getLogger(__name__).info("CUDA graph sizes planned from %s on %s: %s", args.trace,
                                     machine.description.get("hardware") or args.cost_model, sizes)
    return tuple(sizes)


def generate(args: argparse.Namespace) -> int:
    from engine import LLM
    from scheduler import InvalidRequestError, SamplingParams

    llm = LLM(**dataclasses.asdict(engine_config(args)))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
        else:
            outputs = llm.generate(list(args.prompts), params)
    except InvalidRequestError as error:
        print(f"iterserve: {error}", file=sys.stderr)
        return 2
    for output in outputs:
        if args.json:
            print(json.dumps({"text": output.text, "token_ids": output.token_ids,
                              "finish_reason": output.finish_reason}))
        else:
            print(output.text)
    return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: smollm2, or the model folder's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("ITERSERVE_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $ITERSERVE_API_KEY)")
    parser.add_argument("--max-queued-requests", type=int, default=1024,
                        help="answer 429 once this many requests wait for a seat (0: no limit)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM")
    parser.add_argument("--max-body-size", default="2MiB", help="larger request bodies get 413")
    parser.add_argument("--metrics-compat", choices=["vllm"], default=None,
                        help="also export metrics under vLLM's names")
    parser.add_argument("--queue-timeout", type=float, default=None, metavar="S",
                        help="a request not yet scheduled S seconds after it arrived ends with 408")
    parser.add_argument("--tenants", default=None, metavar="FILE",
                        help="TOML: per tenant its weight (fair share), default priority, API keys, TTFT and "
                             "TPOT targets, KV share, queue bound and token rate limit (scheduler/tenants.py)")
    parser.add_argument("--share-prefix-cache", action="store_true",
                        help="let requests of different users (the `user` field) share cached prefixes; off by "
                             "default, since a fast first token tells one user that another sent the same prefix")
    parser.add_argument("--allow-special-tokens-in-messages", action="store_true",
                        help="encode special-token text in chat messages (<|im_end|>) as control tokens; off by "
                             "default, so a user cannot write turns of other roles")
    parser.add_argument("--seed", type=int, default=0, help="the engine's seed for unseeded requests")
    parser.add_argument("--trace", default=None, metavar="FILE",
                        help="--cuda-graph-sizes auto: the workload (a jsonl trace, as bench takes) to plan them for")
    parser.add_argument("--engine-core", default="auto", choices=["auto", "thread", "process"],
                        help="where the engine loop runs: a thread of the server, or a process of its own so that "
                             "HTTP and the step never share the GIL; auto: a process (faster on CPU and CUDA alike, "
                             "BENCHMARKS.md)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return "smollm2" if args.model is None else Path(args.model).expanduser().resolve().name


def engine_core(args: argparse.Namespace) -> str:
    """Where `serve` runs the engine loop: what --engine-core says; auto is a process on every
    device, as measured (on 2 CPU cores it cut median TTFT and TPOT by a third; on CUDA the
    step's host work must never wait on HTTP's share of the GIL)."""
    return "process" if args.engine_core == "auto" else args.engine_core


def serve(args: argparse.Namespace) -> int:
    from engine import LLMEngine
    from engine.config import parse_size
    from server.app import build_app
    from server.engine_process import EngineProcess
    from server.runner import run_server
    from server.serving import ServerSettings
    from scheduler.tenants import Tenants, TenantsError, load_tenants

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tenants = load_tenants(args.tenants) if args.tenants else Tenants.default_only()
    except TenantsError as error:
        print(f"iterserve: {error}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        served_model_name=served_model_name(args),
        api_key=args.api_key or None,
        max_queued_requests=args.max_queued_requests or None,
        max_body_bytes=parse_size(args.max_body_size),
        metrics_compat=args.metrics_compat,
        shutdown_timeout_s=args.shutdown_timeout,
        share_prefix_cache=args.share_prefix_cache,
        allow_special_tokens_in_messages=args.allow_special_tokens_in_messages,
        tenants=tenants,
    )
    try:
        config = dataclasses.replace(engine_config(args), tenant_weights=tenants.weights,
                                     tenant_kv_fractions=tenants.kv_fractions, queue_timeout_s=args.queue_timeout)
        if args.cuda_graph_sizes == "auto":
            config = dataclasses.replace(config, cuda_graph_sizes=planned_cuda_graph_sizes(args, config, tenants))
        llm_engine = EngineProcess(config) if engine_core(args) == "process" else LLMEngine(config)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # a bad --model, cache size or trace: no traceback
        print(f"iterserve: {error}", file=sys.stderr)
        return 2
    try:
        app = build_app(llm_engine, settings)
        run_server(app, args.host, args.port, settings.shutdown_timeout_s, args.log_level)
    finally:
        # A start-up that fails after the load would leave the engine process waiting on a
        # front end that never comes; after a normal stop this finds it ended already.
        if isinstance(llm_engine, EngineProcess):
            llm_engine.close()
    return 0


def bench(args: argparse.Namespace) -> int:
    from loadtest.cli import run

    return run(args)


def simulate(args: argparse.Namespace) -> int:
    from loadtest.simulate import run

    try:
        config = engine_config(args)
    except ValueError as error:  # a bad size
        print(f"iterserve simulate: {error}", file=sys.stderr)
        return 2
    return run(args, config)


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return values


def plan(args: argparse.Namespace) -> int:
    from scheduler.planner import PlanCosts, PlanError, PlanLimits, PlanRequest, plan as make_plan

    try:
        requests = []
        for number, line in enumerate(Path(args.requests).read_text().splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    requests.append(PlanRequest(str(row["id"]), int(row["prompt_len"]), int(row["gen_len"])))
                except (ValueError, KeyError, TypeError) as error:
                    raise PlanError(f"{args.requests}, line {number}: needs id, prompt_len and gen_len ({error})")
        costs = PlanCosts(args.batch_overhead, args.compile_cost, args.prefill_cost, args.decode_step_cost,
                          args.decode_token_cost)
        limits = PlanLimits(args.max_shapes, args.align, args.max_batch, args.max_padding_ratio,
                            args.max_p95_latency)
        result = make_plan(requests, costs, limits)
    except (OSError, PlanError) as error:
        print(f"iterserve plan: {error}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    metrics = result.metrics
    print(f"{len(requests)} requests in {metrics['num_batches']} batches of {metrics['num_shapes']} shapes "
          f"{result.shapes}: cost {metrics['total_cost']:.1f}, padding {metrics['padding_ratio']:.1%}, "
          f"P95 latency {metrics['p95_latency']:.1f}; wrote {args.out}")
    for name, check in metrics["limits"].items():
        if not check["ok"]:
            print(f"iterserve plan: limit {name} = {check['limit']} not met: {check['value']:.3f}", file=sys.stderr)
    return 0 if metrics["feasible"] else 1


def calibrate(args: argparse.Namespace) -> int:
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grid = (positive_ints(args.batch_sizes), positive_ints(args.prompt_lens), args.output_len)
        if args.server:
            import asyncio

            import httpx

            from loadtest.calibrate import calibrate_server

            try:
                saved = asyncio.run(calibrate_server(args.server, args.out, *grid, api_key=args.api_key))
            except httpx.HTTPError as error:
                raise ValueError(f"{args.server}: {error!r}") from None
            print(f"{args.server}: {saved['coefficients']}; wrote {args.out}")
            return 0
        from engine.calibrate import main

        return main(engine_config(args), args.out, *grid)
    except (FileNotFoundError, ValueError) as error:
        print(f"iterserve: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iterserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete prompts offline and print the completions")
    add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON line per prompt with text and token_ids")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.set_defaults(run=generate)

    srv = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_arguments(srv)
    add_server_arguments(srv)
    srv.set_defaults(run=serve)

    from loadtest.cli import add_bench_arguments  # stdlib only at import; the run imports the rest

    bench_parser = commands.add_parser("bench", help="load-test an OpenAI-compatible server, or plot results")
    add_bench_arguments(bench_parser)
    bench_parser.set_defaults(run=bench)

    from loadtest.simulate import add_simulate_arguments  # stdlib only at import, as bench

    sim = commands.add_parser("simulate", help="a workload through the real scheduler on a virtual clock")
    add_engine_arguments(sim)
    add_simulate_arguments(sim)
    sim.set_defaults(run=simulate)

    planner = commands.add_parser("plan", help="batch known requests into at most K padded shapes at least cost")
    planner.add_argument("requests", metavar="REQUESTS.jsonl", help="one JSON object a line: id, prompt_len, gen_len")
    planner.add_argument("--max-shapes", type=int, required=True, metavar="K")
    planner.add_argument("--align", type=int, default=64, metavar="A", help="shapes are multiples of A")
    planner.add_argument("--out", required=True, metavar="PLAN.json")
    planner.add_argument("--max-batch", type=int, default=64, help="requests per batch at most")
    planner.add_argument("--max-padding-ratio", type=float, default=None,
                         help="padded prompt tokens over real ones, minus 1, at most")
    planner.add_argument("--max-p95-latency", type=float, default=None, help="in cost units, from the start")
    planner.add_argument("--batch-overhead", type=float, default=5.0, help="cost of launching one batch")
    planner.add_argument("--compile-cost", type=float, default=1e-4, help="per shape, times its length squared")
    planner.add_argument("--prefill-cost", type=float, default=0.01, help="per padded prompt token")
    planner.add_argument("--decode-step-cost", type=float, default=1.0,
                         help="per decode step of a batch (it runs to its longest generation)")
    planner.add_argument("--decode-token-cost", type=float, default=0.01, help="per request per decode step")
    planner.set_defaults(run=plan)

    cal = commands.add_parser("calibrate", help="fit the step cost model to this engine's measured steps")
    add_engine_arguments(cal)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", required=True, help="where to write the cost model (JSON)")
    cal.add_argument("--batch-sizes", default="1,4,16,64", help="requests that run together")
    cal.add_argument("--prompt-lens", default="32,256,1024", help="prompt tokens of each request")
    cal.add_argument("--output-len", type=int, default=32, help="tokens each request generates")
    cal.add_argument("--server", default=None, metavar="URL",
                     help="calibrate a live iterserve server under HTTP load instead of an engine here")
    cal.add_argument("--api-key", default=os.environ.get("ITERSERVE_API_KEY"), help="for --server")
    cal.set_defaults(run=calibrate)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in commands.choices:
        # Intermixed, so flags may follow prompts: `iterserve generate "hi" --chat "there"`.
        args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
