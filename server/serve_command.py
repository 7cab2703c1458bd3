"""`iterserve serve`: its flags, and starting the engine (a process of its own, or a thread)
and the HTTP server in front of it."""

import argparse
import dataclasses
import logging
import os
from pathlib import Path
import sys

from server.engine_args import engine_config


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
    parser.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                        help="a Jinja chat template, or a file holding one, used in place of the model's own")
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


def model_aliases(args: argparse.Namespace) -> tuple[str, ...]:
    """Other names requests may give the model: the --model string as typed, which is what vLLM
    serves it as (so `vllm bench serve --model PATH` finds it), unless a name was chosen."""
    if args.served_model_name or args.model is None or args.model == served_model_name(args):
        return ()
    return (args.model,)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: the value itself where it holds a template's characters, else the
    contents of the file it names (as vLLM reads it)."""
    if value is None or any(mark in value for mark in "{}\n"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template")
    return path.read_text(encoding="utf-8")


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
    from server.memory import frozen_startup_heap
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
        model_aliases=model_aliases(args),
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
        settings.chat_template = load_chat_template(args.chat_template)
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
        with frozen_startup_heap():
            run_server(app, args.host, args.port, settings.shutdown_timeout_s, args.log_level)
    finally:
        # A start-up that fails after the load would leave the engine process waiting on a
        # front end that never comes; after a normal stop this finds it ended already.
        if isinstance(llm_engine, EngineProcess):
            llm_engine.close()
    return 0
