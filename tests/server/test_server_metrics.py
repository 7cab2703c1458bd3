"""/metrics, read with prometheus_client's own parser, agrees with what the clients were served."""

import json
from pathlib import Path
import re

import httpx
import pytest

from server_harness import sample, scrape, start_server

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def deltas(before: dict, after: dict, *names: str, **labels) -> list[float]:
    return [sample(after, name, **labels) - sample(before, name, **labels) for name in names]


def test_histogram_counts_match_requests_and_tokens(client, tiny_server):
    before = scrape(tiny_server)
    completions = [
        client.completions.create(model="tiny", prompt="Hello there", max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
        for max_tokens in (1, 4, 9)
    ]
    completions.append(client.completions.create(model="tiny", prompt="Two of them", n=2, max_tokens=3,
                                                 extra_body={"ignore_eos": True}))
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chat_usage = list(stream)[-1].usage
    after = scrape(tiny_server)

    num_requests = 3 + 2 + 1  # engine requests: n=2 is two of them
    num_tokens = sum(c.usage.completion_tokens for c in completions) + chat_usage.completion_tokens
    num_prompt_tokens = (sum(c.usage.prompt_tokens for c in completions[:3]) + 2 * completions[3].usage.prompt_tokens
                         + chat_usage.prompt_tokens)
    assert num_tokens == 1 + 4 + 9 + 2 * 3 + 5
    labels = {"model_name": "tiny"}
    ttft, itl, e2e, queue, generated, prompt = deltas(
        before, after, "iterserve_time_to_first_token_seconds_count", "iterserve_inter_token_latency_seconds_count",
        "iterserve_e2e_request_latency_seconds_count", "iterserve_request_queue_time_seconds_count",
        "iterserve_generation_tokens_total", "iterserve_prompt_tokens_total", **labels)
    assert ttft == e2e == queue == num_requests
    assert itl == num_tokens - num_requests  # one interval between each pair of consecutive tokens
    assert generated == num_tokens
    assert prompt == num_prompt_tokens
    [finished] = deltas(before, after, "iterserve_requests_finished_total", finish_reason="length", **labels)
    assert finished == num_requests
    [lengths] = deltas(before, after, "iterserve_request_generation_tokens_sum", **labels)
    assert lengths == num_tokens


def test_every_series_carries_model_name_and_vllm_names_mirror_ours(client, tiny_server):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    samples = scrape(tiny_server)
    # The process_* series (memory, CPU, files, as prometheus_client exports them) describe the server.
    assert all(dict(labels).get("model_name") == "tiny" for name, labels in samples if not name.startswith("process_"))
    assert sample(samples, "process_resident_memory_bytes") > 0
    pairs = [
        ("iterserve_time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count"),
        ("iterserve_inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count"),
        ("iterserve_inter_token_latency_seconds_count", "vllm:inter_token_latency_seconds_count"),
        ("iterserve_e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"),
        ("iterserve_generation_tokens_total", "vllm:generation_tokens_total"),
        ("iterserve_prompt_tokens_total", "vllm:prompt_tokens_total"),
        ("iterserve_num_requests_waiting", "vllm:num_requests_waiting"),
        ("iterserve_num_requests_running", "vllm:num_requests_running"),
        ("iterserve_kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
        ("iterserve_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    ]
    for ours, theirs in pairs:
        assert (theirs, (("model_name", "tiny"),)) in samples, theirs
        assert sample(samples, ours, model_name="tiny") == sample(samples, theirs, model_name="tiny")
    assert (sample(samples, "vllm:request_success_total", model_name="tiny", finished_reason="length")
            == sample(samples, "iterserve_requests_finished_total", model_name="tiny", finish_reason="length"))
    engine = tiny_server.llm_engine
    cache = {"model_name": "tiny", "block_size": str(engine.kv_cache.block_size), "cache_dtype":
             engine.kv_cache_dtype_name, "num_gpu_blocks": str(engine.kv_cache.pool.num_blocks)}
    assert sample(samples, "iterserve_cache_config_info", **cache) == 1
    assert sample(samples, "vllm:cache_config_info", **cache) == 1


def test_the_dashboard_only_queries_metrics_we_export(tiny_server):
    from prometheus_client import CollectorRegistry

    from server.tenant_metrics import TenantMetrics

    # The per-tenant row's series exist only on a server with --tenants: take their names
    # from the class that exports them.
    registry = CollectorRegistry()
    TenantMetrics(registry, "tiny", ["default"], (1.0,), {"default": (1.0, 0.1)})
    tenant_series = {sample.name for family in registry.collect() for sample in family.samples}
    exported = {name for name, _ in scrape(tiny_server)} | tenant_series
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 9
    referenced = {name for expr in expressions for name in re.findall(r"\biterserve_[a-z0-9_]+", expr)}
    assert referenced and referenced <= exported, referenced - exported


def test_the_prometheus_config_scrapes_metrics():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "iterserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"]


def test_preemptions_by_mode_and_swapped_bytes_are_counted(tiny_model_path, torch_threads):
    server = start_server(tiny_model_path, "tiny", max_model_len=128, num_kv_blocks=40,
                          engine_args={"block_size": 4, "swap_space": 16 * 1024 * 1024, "swap_threshold_tokens": 1,
                                       "enable_prefix_caching": False})
    try:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            body = {"model": "tiny", "prompt": [f"Story {i} begins" for i in range(6)], "max_tokens": 40,
                    "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
        samples = scrape(server)
        swaps = sample(samples, "iterserve_preemptions_by_mode_total", model_name="tiny", mode="swap")
        assert swaps > 0 and swaps == sample(samples, "iterserve_num_preemptions_total", model_name="tiny")
        swapped_out = sample(samples, "iterserve_kv_swapped_bytes_total", model_name="tiny", direction="out")
        assert swapped_out > 0 and swapped_out % server.llm_engine.kv_bytes_per_block == 0
        assert swapped_out == sample(samples, "iterserve_kv_swapped_bytes_total", model_name="tiny", direction="in")
    finally:
        server.stop()
