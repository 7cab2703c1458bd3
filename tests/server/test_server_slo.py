"""SLO targets, token rate limits and goodput through HTTP: a tenant's targets reach its requests,
an unreachable TTFT target is a 429 with the envelope and the reason, a tenant over its token
rate gets 429 with Retry-After while others go on, and /metrics counts refusals and goodput."""

import json

import httpx
import pytest

from scheduler.tenants import load_tenants
from server_harness import sample, scrape, start_server, wait_until

pytestmark = pytest.mark.slow

TENANTS = """
[tenants.chat]
api_keys = ["sk-chat"]
slo_ttft_ms = 60000
slo_tpot_ms = 30000

[tenants.batch]
api_keys = ["sk-batch"]
tokens_per_minute = 100
"""

# Steps said to take 20 s each: no request can have a first token within seconds.
SLOW_STEPS = {"coefficients": {"base_s": 20.0, "prefill_token_s": 0.0, "decode_seq_s": 0.0, "context_token_s": 0.0}}


@pytest.fixture(scope="module")
def slo_server(tiny_model_path, tmp_path_factory, torch_threads):
    folder = tmp_path_factory.mktemp("slo")
    (folder / "tenants.toml").write_text(TENANTS)
    (folder / "cost.json").write_text(json.dumps(SLOW_STEPS))
    server = start_server(tiny_model_path, "tiny", num_kv_blocks=64, tenants=load_tenants(folder / "tenants.toml"),
                          engine_args={"policy": "slo", "cost_model": str(folder / "cost.json")})
    yield server
    server.stop()


def post(server, key: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, **body})


def rejected(samples, reason: str, tenant: str | None = None) -> float:
    if tenant is None:
        return sample(samples, "iterserve_requests_rejected_total", model_name="tiny", reason=reason)
    return sample(samples, "iterserve_tenant_requests_rejected_total", model_name="tiny", tenant=tenant,
                  reason=reason)


def test_an_unreachable_ttft_target_is_refused_with_the_reason_and_a_reachable_one_served(slo_server):
    before = scrape(slo_server)
    refused = post(slo_server, "sk-chat", slo_ttft_ms=500)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "slo_unreachable" and error["type"] == "rate_limit_error"
    assert "TTFT target of 500 ms cannot be met" in error["message"]
    after = scrape(slo_server)
    assert rejected(after, "slo_unreachable") - rejected(before, "slo_unreachable") == 1
    assert rejected(after, "slo_unreachable", "chat") - rejected(before, "slo_unreachable", "chat") == 1
    # The tenant's own target (60 s) is reachable even at 20 s a step: served.
    assert post(slo_server, "sk-chat").status_code == 200
    wait_until(lambda: not slo_server.llm_engine.has_unfinished_requests(), what="the engine to go idle")
    assert slo_server.llm_engine.kv_cache.pool.num_free_blocks == slo_server.llm_engine.kv_cache.pool.num_blocks


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_a_streaming_request_refused_by_the_engine_still_gets_its_status(slo_server, endpoint, body):
    with httpx.stream("POST", f"{slo_server.url}{endpoint}", timeout=60, headers={"Authorization": "Bearer sk-chat"},
                      json={"model": "tiny", "max_tokens": 3, "stream": True, "slo_ttft_ms": 0.001, **body}) as reply:
        assert reply.status_code == 429
        assert json.loads(reply.read())["error"]["code"] == "slo_unreachable"
    assert not slo_server.llm_engine.has_unfinished_requests()


def test_a_tenants_targets_reach_its_requests_unless_a_request_gives_its_own(slo_server):
    engine = slo_server.llm_engine
    seen = []
    original = engine.scheduler.add_request

    def spy(request):
        seen.append((request.slo_ttft_s, request.slo_tpot_s))
        return original(request)

    engine.scheduler.add_request = spy
    try:
        assert post(slo_server, "sk-chat").status_code == 200
        assert post(slo_server, "sk-chat", slo_ttft_ms=90000, slo_tpot_ms=40000).status_code == 200
        assert post(slo_server, "sk-batch", max_tokens=1).status_code == 200
    finally:
        del engine.scheduler.add_request
    assert seen == [(60.0, 30.0), (90.0, 40.0), (None, None)]


def test_goodput_counts_requests_that_made_their_targets(slo_server):
    def within(samples, tenant):
        return sample(samples, "iterserve_tenant_requests_within_slo_total", model_name="tiny", tenant=tenant)

    before = scrape(slo_server)
    assert post(slo_server, "sk-chat", max_tokens=4).status_code == 200  # 60 s and 30 s: made
    assert post(slo_server, "sk-chat", max_tokens=4, slo_tpot_ms=0.001).status_code == 200  # a microsecond: missed
    after = scrape(slo_server)
    assert within(after, "chat") - within(before, "chat") == 1
    assert (sample(after, "iterserve_requests_within_slo_total", model_name="tiny")
            - sample(before, "iterserve_requests_within_slo_total", model_name="tiny")) == 1
    assert sample(after, "iterserve_tenant_slo_ttft_seconds", model_name="tiny", tenant="chat") == 60.0
    assert sample(after, "iterserve_cost_model_seconds", model_name="tiny", term="base") >= 0.0
    assert sample(after, "iterserve_step_token_budget", model_name="tiny") >= 1


def test_a_tenant_over_its_token_rate_gets_429_with_retry_after_and_others_go_on(slo_server):
    before = scrape(slo_server)
    too_big = post(slo_server, "sk-batch", max_tokens=200)
    assert too_big.status_code == 429 and "more than the limit of tenant 'batch'" in too_big.json()["error"]["message"]
    statuses = [post(slo_server, "sk-batch", max_tokens=40).status_code for _ in range(3)]
    assert statuses[0] == 200 and statuses[-1] == 429  # the minute's 100 tokens ran out
    over = post(slo_server, "sk-batch", max_tokens=40)
    assert over.json()["error"]["code"] == "rate_limit_exceeded" and int(over.headers["Retry-After"]) >= 1
    assert post(slo_server, "sk-chat").status_code == 200  # chat has no rate limit
    after = scrape(slo_server)
    assert rejected(after, "rate_limit_exceeded", "batch") - rejected(before, "rate_limit_exceeded", "batch") >= 3
