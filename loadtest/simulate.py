"""`iterserve simulate`: a workload through the real scheduler on a virtual clock, reported as
`iterserve bench` reports a live run (the same JSON fields and plots, `per_tenant` included).

  iterserve simulate --cost-model cpu.json --trace chat-poisson.jsonl --out sim.json
  iterserve simulate --hardware h100 --model llama-3-8b --dataset sharegpt-like --num-prompts 100000 \\
      --request-rate 20 --out h100.json
  iterserve simulate --hardware h100 --model llama-3-70b --tensor-parallel-size 4 --dataset sharegpt-like \\
      --sweep-rates 2,4,8,16,32 --slo-ttft-ms 2000 --slo-tpot-ms 100 --target-rate 50

Step times come from a calibration (`--cost-model FILE`, written by `iterserve calibrate`)
or from the hardware's peaks and the model's shapes (`--hardware`, scheduler/roofline.py).
The scheduler's flags are `iterserve serve`'s. With `--sweep-rates` and SLOs, it reports the
highest rate at which `--slo-attainment` of the requests meet them, and with
`--target-rate` the replicas that rate needs. No HTTP and no model: loadtest's one part that
does not talk to a server, because it stands in for one.
"""

import argparse
import dataclasses
from datetime import datetime, timezone
import json
import math
from pathlib import Path
import sys
import time

KEEP_ITL_UP_TO = 20_000  # requests; beyond, inter-token latencies are not kept (memory), TPOT still is


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from loadtest.cli import add_load_arguments, add_report_arguments

    parser.description = __doc__.split("\n\n")[0]
    # --cost-model FILE (an engine flag, as for serve) gives the step times of a calibration.
    machine = parser.add_argument_group("machine")
    machine.add_argument("--hardware", default=None, choices=["h100", "h200", "a100"],
                         help="step times from this device's peaks and --model's shapes (a preset name: "
                              "smollm2-135m, llama-3-8b, llama-3-70b; or a Hugging Face folder)")
    machine.add_argument("--tensor-parallel-size", type=int, default=1)
    machine.add_argument("--step-overhead-ms", type=float, default=2.0,
                         help="--hardware: host time per step beyond the device's (default 2 ms)")
    add_load_arguments(parser.add_argument_group("load"), live=False)
    report = parser.add_argument_group("report")
    add_report_arguments(report)
    report.add_argument("--slo-attainment", type=float, default=0.9,
                        help="--sweep-rates: a rate meets the SLOs when this share of its requests do")
    report.add_argument("--target-rate", type=float, default=None,
                        help="--sweep-rates: how many replicas this request rate needs")
    parser.add_argument("--tenants", default=None, metavar="FILE", help="as for serve")
    parser.add_argument("--queue-timeout", type=float, default=None, metavar="S", help="as for serve")


def run(args: argparse.Namespace, config) -> int:
    """`config`: the EngineConfig that `serve` would build from the same flags."""
    from loadtest.cli import BenchError, load_requests, parse_rates, write_results
    from loadtest.trace import TraceError
    from scheduler.tenants import TenantsError

    try:
        tenants = load_tenants(args)
        config = dataclasses.replace(config, tenant_weights=tenants.weights, tenant_kv_fractions=tenants.kv_fractions,
                                     queue_timeout_s=args.queue_timeout)
        machine = Machine.from_args(args, config)
        requests = load_requests(args)
        rates = parse_rates(args.sweep_rates) if args.sweep_rates else [args.request_rate]
        runs = [simulate_pass(args, config, tenants, machine, requests, rate) for rate in rates]
    except (BenchError, TraceError, TenantsError, ValueError, OSError) as error:
        print(f"iterserve simulate: {error}", file=sys.stderr)
        return 2
    if args.sweep_rates:
        report_capacity(args, runs)
    write_results(args, runs)
    return 0


class Machine:
    """Where the simulated steps run: their time, and the KV cache's size in blocks."""

    def __init__(self, step_time, kv_bytes_per_block: float, num_blocks: int, description: dict):
        self.step_time = step_time
        self.kv_bytes_per_block = kv_bytes_per_block
        self.num_blocks = num_blocks
        self.description = description

    @classmethod
    def from_args(cls, args: argparse.Namespace, config) -> "Machine":
        if (args.cost_model is None) == (args.hardware is None):
            raise ValueError("give one of --cost-model FILE (from iterserve calibrate) and --hardware")
        if args.cost_model is not None:
            return cls.calibrated(args.cost_model, config)
        return cls.roofline(args.hardware, args.model, config, args.tensor_parallel_size, args.step_overhead_ms)

    @classmethod
    def calibrated(cls, path: str, config) -> "Machine":
        from scheduler.cost_model import StepCostModel

        saved = json.loads(Path(path).read_text())
        if "kv_bytes_per_block" not in saved or "coefficients" not in saved:
            raise ValueError(f"{path}: not a calibration from iterserve calibrate")
        measured = saved.get("kv_cache_dtype")
        if config.kv_cache_dtype != "auto" and measured and config.kv_cache_dtype != measured:
            # Its step times and block size are the measured cache's: another dtype needs its own calibration.
            raise ValueError(f"{path} was calibrated with a {measured} KV cache, not {config.kv_cache_dtype}: "
                             f"calibrate again with --kv-cache-dtype {config.kv_cache_dtype}")
        model = StepCostModel.from_json(saved)
        block_size = config.block_size
        per_block = saved["kv_bytes_per_block"] * block_size / saved.get("block_size", block_size)
        num_blocks = config.num_kv_blocks or int(config.kv_cache_memory // per_block)
        return cls(model.predict, per_block, num_blocks,
                   {"cost_model": path, **{k: v for k, v in saved.items() if k != "num_observed"}})

    @classmethod
    def roofline(cls, hardware: str, model: str | None, config, tensor_parallel_size: int = 1,
                 step_overhead_ms: float = 2.0) -> "Machine":
        """`model`: a preset name, a Hugging Face folder, or None for the embedded SmolLM2."""
        from scheduler.roofline import HARDWARE, KV_CACHE_BYTES, MODELS, ModelShape, RooflineStepTime

        if model is None or model in MODELS:
            shape = MODELS[model or "smollm2-135m"]
        else:
            shape = ModelShape.from_hf_config(model)
        shape = dataclasses.replace(shape, kv_bytes_per_value=KV_CACHE_BYTES.get(config.kv_cache_dtype))
        roofline = RooflineStepTime(HARDWARE[hardware], shape, tensor_parallel_size,
                                    step_overhead_s=step_overhead_ms / 1000)
        per_block = shape.kv_bytes_per_token * config.block_size
        num_blocks = config.num_kv_blocks or int(roofline.kv_cache_bytes() // per_block)
        return cls(roofline, per_block, num_blocks,
                   {"hardware": roofline.hardware.name, "model": shape.name,
                    "tensor_parallel_size": tensor_parallel_size, "step_overhead_ms": step_overhead_ms})


def simulate_pass(args: argparse.Namespace, config, tenants, machine: Machine, requests: list,
                  rate: float | None) -> dict:
    from loadtest.cli import _rate_value
    from loadtest.metrics import format_summary, report
    from loadtest.trace import retime
    from scheduler.planner import plan_capture_sizes

    if rate is not None:
        requests = retime(requests, rate, args.burstiness, args.seed)
    started = time.perf_counter()
    result = run_simulation(requests, config, tenants, machine, keep_itl=len(requests) <= KEEP_ITL_UP_TO)
    wall_s = time.perf_counter() - started
    # Reported by the trace's tenant, as bench reports them, whichever tenant served them.
    trace_tenants = {request.id: request.tenant for request in requests}
    records = [record(outcome, trace_tenants[outcome.request.id]) for outcome in result.outcomes]
    duration_s = max((r.start_s + r.e2el_ms / 1000 for r in records if r.e2el_ms is not None), default=0.0)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "label": args.label,
        "simulated": {**machine.description, "num_kv_blocks": machine.num_blocks, "num_steps": result.num_steps,
                      "num_preemptions": result.num_preemptions, "wall_s": wall_s,
                      "scheduling_policy": args.scheduling_policy,
                      "decode_steps_by_batch": dict(sorted(result.decode_steps_by_batch.items()))},
        "trace": args.trace,
        "dataset": None if args.trace else args.dataset,
        "num_prompts": len(requests),
        "request_rate": _rate_value(rate, args),
        "burstiness": args.burstiness,
        "seed": args.seed,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
    }
    summary |= report(records, duration_s, args.slo_ttft_ms, args.slo_tpot_ms)
    print(format_summary(summary))
    print(f"simulated {len(requests)} requests in {result.num_steps} steps, {wall_s:.1f} s of wall time")
    if args.cuda_graph_sizes == "auto":
        sizes = plan_capture_sizes(result.decode_steps_by_batch, args.max_cuda_graph_sizes)
        summary["simulated"]["cuda_graph_sizes"] = sizes
        print(f"decode batch sizes to capture (serve --cuda-graph-sizes {','.join(map(str, sizes))}): {sizes}")
    return summary


def run_simulation(requests: list, config, tenants, machine: Machine, keep_itl: bool = True):
    """`requests` (loadtest.trace.TraceRequest) through the scheduler `config` describes."""
    from scheduler.simulator import Deployment, simulate

    sim_requests = [sim_request(request, tenants) for request in requests]
    max_model_len = config.max_model_len or max(r.prompt_len + r.output_len for r in requests)
    num_host_blocks = int(config.swap_space // machine.kv_bytes_per_block)
    deployment = Deployment(config.scheduler_config(max_model_len, swaps=num_host_blocks > 0), machine.num_blocks,
                            config.block_size, num_host_blocks)
    return simulate(sim_requests, deployment, machine.step_time, keep_itl=keep_itl)


def cuda_graph_sizes_for_trace(trace: str, config, tenants, machine: Machine, max_sizes: int) -> list[int]:
    """`serve --cuda-graph-sizes auto --trace FILE`: the trace at its own arrival times through
    serve's scheduler on `machine`, and the at most `max_sizes` decode batch sizes that pad its
    pure-decode steps least (scheduler/planner.py: plan_capture_sizes)."""
    from loadtest.trace import read_trace
    from scheduler.planner import plan_capture_sizes

    requests = read_trace(trace)
    if not requests:
        raise ValueError(f"{trace}: no requests to plan CUDA graph sizes from")
    result = run_simulation(requests, config, tenants, machine, keep_itl=False)
    return plan_capture_sizes(result.decode_steps_by_batch, max_sizes)


def load_tenants(args: argparse.Namespace):
    from scheduler.tenants import Tenants, load_tenants as read

    return read(args.tenants) if args.tenants else Tenants.default_only()


def sim_request(request, tenants):
    """As `serve` would queue it from `iterserve bench`: the trace's tenant sent as `user`, its
    priority when it has one, else the tenant's, and the tenant's targets."""
    from scheduler.simulator import SimRequest

    tenant = tenants.resolve(None, request.tenant)
    return SimRequest(request.id, request.arrival_s, request.prompt_len, request.output_len, tenant.name,
                      request.priority or tenant.priority, _seconds(tenant.slo_ttft_ms), _seconds(tenant.slo_tpot_ms))


def record(outcome, tenant: str):
    """What `iterserve bench` would have recorded of this request, in its units."""
    from loadtest.client import RequestRecord

    request = outcome.request
    result = RequestRecord(request.id, tenant, request.priority, request.arrival_s, request.prompt_len,
                           request.output_len, start_s=request.arrival_s, prompt_tokens=request.prompt_len)
    if outcome.finish_reason != "length":
        result.error = outcome.error or f"finished with {outcome.finish_reason}"
        return result
    result.success, result.error = True, None
    result.output_tokens = outcome.num_output_tokens
    result.ttft_ms = (outcome.first_token_s - request.arrival_s) * 1000
    result.e2el_ms = (outcome.finished_s - request.arrival_s) * 1000
    if outcome.num_output_tokens > 1:
        result.tpot_ms = (result.e2el_ms - result.ttft_ms) / (outcome.num_output_tokens - 1)
    result.itl_ms = [seconds * 1000 for seconds in outcome.itl_s]
    return result


def report_capacity(args: argparse.Namespace, runs: list[dict]) -> None:
    """The highest swept rate whose requests meet the SLOs often enough, and replicas for a target."""
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        return
    meeting = [run["request_rate"] for run in runs
               if run["num_prompts"] and run["goodput"] * run["duration"] >= args.slo_attainment * run["num_prompts"]]
    best = max(meeting, default=None)
    for run in runs:
        run["max_rate_within_slo"] = best
    if best is None:
        print(f"no swept rate met the SLOs for {args.slo_attainment:.0%} of its requests")
        return
    print(f"highest swept rate with {args.slo_attainment:.0%} of requests within the SLOs: {best} req/s")
    if args.target_rate:
        replicas = math.ceil(args.target_rate / best)
        for run in runs:
            run["replicas_for_target_rate"] = {"target_rate": args.target_rate, "replicas": replicas}
        print(f"replicas for {args.target_rate} req/s: {replicas}")


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000
