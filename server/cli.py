"""`iterserve`: one command, with subcommands."""

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
import sys

from server.engine_args import add_engine_arguments, engine_config
from server.serve_command import add_server_arguments, serve


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


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("requests", metavar="REQUESTS.jsonl", help="one JSON object a line: id, prompt_len, gen_len")
    parser.add_argument("--max-shapes", type=int, required=True, metavar="K")
    parser.add_argument("--align", type=int, default=64, metavar="A", help="shapes are multiples of A")
    parser.add_argument("--out", required=True, metavar="PLAN.json")
    parser.add_argument("--max-batch", type=int, default=64, help="requests per batch at most")
    parser.add_argument("--max-padding-ratio", type=float, default=None,
                        help="padded prompt tokens over real ones, minus 1, at most")
    parser.add_argument("--max-p95-latency", type=float, default=None, help="in cost units, from the start")
    parser.add_argument("--batch-overhead", type=float, default=5.0, help="cost of launching one batch")
    parser.add_argument("--compile-cost", type=float, default=1e-4, help="per shape, times its length squared")
    parser.add_argument("--prefill-cost", type=float, default=0.01, help="per padded prompt token")
    parser.add_argument("--decode-step-cost", type=float, default=1.0,
                        help="per decode step of a batch (it runs to its longest generation)")
    parser.add_argument("--decode-token-cost", type=float, default=0.01, help="per request per decode step")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="where to write the cost model (JSON)")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="requests that run together")
    parser.add_argument("--prompt-lens", default="32,256,1024", help="prompt tokens of each request")
    parser.add_argument("--output-len", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="calibrate a live iterserve server under HTTP load instead of an engine here")
    parser.add_argument("--api-key", default=os.environ.get("ITERSERVE_API_KEY"), help="for --server")


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
    add_plan_arguments(planner)
    planner.set_defaults(run=plan)

    cal = commands.add_parser("calibrate", help="fit the step cost model to this engine's measured steps")
    add_engine_arguments(cal)
    add_calibrate_arguments(cal)
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
