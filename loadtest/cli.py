"""`iterserve bench`: drive an OpenAI-compatible server and report; `iterserve bench plot`: draw results.

  iterserve bench --base-url http://127.0.0.1:8000 --trace chat-poisson.jsonl --out runs/chat.json
  iterserve bench --dataset random --num-prompts 64 --sweep-rates 0.5,1,2 --out runs/sweep.json
  iterserve bench plot runs/iterserve.json runs/vllm.json --out runs/side-by-side.png

Only stdlib imports at the top: `iterserve` builds this parser on every start.
"""

import argparse
import asyncio
from datetime import datetime, timezone
import json
import math
import os
from pathlib import Path
import sys


class BenchError(RuntimeError):
    """A problem with the command or the server that ends the run before it starts."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "\n\n".join(__doc__.split("\n\n")[:2])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", nargs="*", metavar="plot FILE",
                        help="`plot A.json B.json ...`: draw result files on one figure (--out FIG.png)")
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root, without /v1")
    target.add_argument("--endpoint", default="/v1/completions")
    target.add_argument("--model", default=None, help="the model name to send (default: the server's first)")
    target.add_argument("--api-key", default=os.environ.get("ITERSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="sent as a bearer token (default: $ITERSERVE_API_KEY or $OPENAI_API_KEY)")
    target.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer folder or id (default: the server's /tokenize route)")
    target.add_argument("--extra-body", type=json_object, default={}, help="JSON merged into every request body")
    target.add_argument("--send-priority", action=argparse.BooleanOptionalAction, default=True,
                        help="send the trace's non-zero priorities (vLLM needs --scheduling-policy priority)")
    add_load_arguments(parser.add_argument_group("load"))
    add_report_arguments(parser.add_argument_group("report"))
    parser.add_argument("--labels", default=None, help="plot: comma-separated names for the files")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def add_load_arguments(load, live: bool = True) -> None:
    """The workload's flags, shared by `bench` and `simulate` (`live`: those only a live run has)."""
    load.add_argument("--trace", default=None, help="jsonl: id, arrival_s, prompt_len, output_len, tenant, priority")
    load.add_argument("--dataset", default="random", choices=["random", "sharegpt-like", "mixed"])
    load.add_argument("--num-prompts", type=int, default=None, help="default: the whole trace, or 100")
    load.add_argument("--input-len", type=int, default=None, help="random: mean; sharegpt-like: median")
    load.add_argument("--output-len", type=int, default=None, help="random: mean; sharegpt-like: median; mixed: max")
    load.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths within +-this fraction")
    load.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals per second; inf: all at once (default: a trace's own times, else inf)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 is Poisson")
    load.add_argument("--sweep-rates", default=None, help="r1,r2,...: one pass per request rate")
    load.add_argument("--seed", type=int, default=0)
    if live:
        load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
        load.add_argument("--deadline-s", type=float, default=600.0,
                          help="per pass: requests not finished by then are cancelled and count as failed")


def add_report_arguments(report) -> None:
    report.add_argument("--slo-ttft-ms", type=float, default=None)
    report.add_argument("--slo-tpot-ms", type=float, default=None)
    report.add_argument("--out", default=None, help="result JSON (for plot: the PNG)")
    report.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                        help="also draw the result next to --out, as a PNG")
    report.add_argument("--label", default=None, help="the result's name on plots (default: the file's name)")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    from loadtest.prompts import TokenizerUnavailable
    from loadtest.trace import TraceError

    try:
        if args.action:
            return plot_command(args)
        return asyncio.run(bench(args))
    except (BenchError, TraceError, TokenizerUnavailable, ValueError) as error:
        print(f"iterserve bench: {error}", file=sys.stderr)
        return 2


def plot_command(args: argparse.Namespace) -> int:
    from loadtest.plots import plot_files

    if args.action[0] != "plot" or len(args.action) < 2:
        raise BenchError("the only action is `plot A.json [B.json ...] --out FIG.png`")
    if not args.out:
        raise BenchError("plot needs --out FIG.png")
    labels = args.labels.split(",") if args.labels else None
    try:
        print(f"wrote {plot_files(args.action[1:], args.out, labels)}")
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise BenchError(f"cannot plot {' '.join(args.action[1:])}: {error!r}") from None
    return 0


async def bench(args: argparse.Namespace) -> int:
    import httpx

    from loadtest.prompts import LocalTokenizer, ServerTokenizer, build_prompts

    check_target(args)
    requests = load_requests(args)
    rates = parse_rates(args.sweep_rates) if args.sweep_rates else [args.request_rate]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No pool limit: a cap would queue requests inside the client and count the wait as TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30.0)) as client:
        model = args.model or await first_model(client)
        tokenizer = LocalTokenizer(args.tokenizer) if args.tokenizer else ServerTokenizer(client, model)
        runs = []
        for index, rate in enumerate(rates):
            # New prompts for every pass, or a sweep's later passes would hit the prefix cache of earlier ones.
            prompts = await build_prompts(tokenizer, [request.prompt_len for request in requests], args.seed + index)
            runs.append(await one_pass(client, args, model, requests, prompts, rate))
            write_results(args, runs)  # after every pass: an interrupted sweep keeps what it measured
    return 0


async def one_pass(client, args: argparse.Namespace, model: str, requests: list, prompts: list[str],
                   rate: float | None) -> dict:
    from tqdm import tqdm

    from loadtest.client import SendOptions, run_requests
    from loadtest.metrics import format_summary, report
    from loadtest.trace import retime

    if rate is not None:
        requests = retime(requests, rate, args.burstiness, args.seed)
    options = SendOptions(model=model, endpoint=args.endpoint, max_concurrency=args.max_concurrency,
                          deadline_s=args.deadline_s, send_priority=args.send_priority, extra_body=args.extra_body)
    with tqdm(total=len(requests), desc=f"rate {_rate_value(rate, args)}", unit="req", disable=not args.progress,
              file=sys.stderr) as progress:
        records, duration_s = await run_requests(client, requests, prompts, options, lambda _: progress.update())
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "label": args.label,
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model_id": model,
        "tokenizer_id": args.tokenizer or f"{args.base_url}/tokenize",
        "trace": args.trace,
        "dataset": None if args.trace else args.dataset,
        "num_prompts": len(requests),
        "request_rate": _rate_value(rate, args),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "deadline_s": args.deadline_s,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
    }
    result |= report(records, duration_s, args.slo_ttft_ms, args.slo_tpot_ms)
    print(format_summary(result))
    return result


def check_target(args: argparse.Namespace) -> None:
    """Every request goes to --base-url: the endpoint is a path on it, never a URL of its own."""
    if not args.base_url.startswith(("http://", "https://")):
        raise BenchError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if args.base_url.rstrip("/").endswith("/v1"):
        raise BenchError(f"--base-url is the server's root, without /v1: {args.base_url.rstrip('/')[:-3]}")
    if not args.endpoint.startswith("/") or "://" in args.endpoint:
        raise BenchError(f"--endpoint must be a path such as /v1/completions, got {args.endpoint!r}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be >= 1")
    if not args.deadline_s > 0:
        raise BenchError("--deadline-s must be > 0")


def load_requests(args: argparse.Namespace) -> list:
    from loadtest.trace import generate_requests, read_trace

    if args.trace:
        requests = read_trace(args.trace)
        return requests[:args.num_prompts] if args.num_prompts else requests
    return generate_requests(args.dataset, args.num_prompts or 100, args.seed, args.input_len, args.output_len,
                             args.range_ratio)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in text.split(",") if rate.strip()]
    except ValueError:
        raise BenchError(f"--sweep-rates takes numbers separated by commas, got {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise BenchError(f"--sweep-rates must be > 0, got {text!r}")
    return rates


async def first_model(client) -> str:
    import httpx

    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise BenchError(f"cannot list the models at {client.base_url}/v1/models ({error!r}); "
                         "is the server up? Or pass --model") from None


def write_results(args: argparse.Namespace, runs: list[dict]) -> None:
    from loadtest.plots import plot_rates, plot_run

    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.sweep_rates:
        data = {"label": args.label, "request_rates": [run["request_rate"] for run in runs], "runs": runs}
    else:
        data = runs[0]
    # Compact: with an indent json takes its pure-Python encoder, seconds at 100,000 requests.
    out.write_text(json.dumps(data, allow_nan=False))
    print(f"wrote {out}")
    if args.plot:
        figure = out.with_suffix(".png")
        label = args.label or out.stem
        if args.sweep_rates:
            plot_rates({label: runs}, figure)
        else:
            plot_run(runs[0], figure)
        print(f"wrote {figure}")


def _rate_value(rate: float | None, args: argparse.Namespace):
    """A number, or vLLM's "inf" for all at once, or "trace" for a trace's own arrival times."""
    if rate is None:
        return "trace" if args.trace else "inf"
    return "inf" if math.isinf(rate) else rate
