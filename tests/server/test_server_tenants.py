"""Tenants through HTTP: a tenant's API key authenticates and names the tenant, `user` names only
configured tenants, and a tenant's priority is the default of its requests."""

from contextlib import ExitStack

import httpx
import pytest

from scheduler.tenants import load_tenants
from server_harness import StepGate, sample, scrape, start_server, wait_until

pytestmark = pytest.mark.slow

TENANTS = """
[tenants.chat]
weight = 2
priority = 0
api_keys = ["sk-chat"]

[tenants.batch]
priority = 3
api_keys = ["sk-batch"]
"""


@pytest.fixture(scope="module")
def tenant_server(tiny_model_path, tmp_path_factory, torch_threads):
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(TENANTS)
    server = start_server(tiny_model_path, "tiny", num_kv_blocks=64, tenants=load_tenants(path))
    yield server
    server.stop()


def tenant_and_priority(server, key: str, **fields) -> tuple[str, int]:
    """Send one request and read, inside the engine, whom it was queued for."""
    gate = StepGate(server.llm_engine)
    gate.hold()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            with http.stream("POST", "/v1/completions",
                             json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True, **fields}) as reply:
                assert reply.status_code == 200
                wait_until(lambda: server.llm_engine.scheduler.requests, what="the request to be queued")
                (queued,) = server.llm_engine.scheduler.requests.values()
                found = (queued.tenant, queued.priority)
                gate.open()
                reply.read()
    finally:
        gate.remove()
    return found


def test_a_tenants_key_names_its_tenant_and_priority(tenant_server):
    assert tenant_and_priority(tenant_server, "sk-chat") == ("chat", 0)
    assert tenant_and_priority(tenant_server, "sk-batch") == ("batch", 3)
    assert tenant_and_priority(tenant_server, "sk-batch", priority=1) == ("batch", 1)  # a request's own wins
    assert tenant_and_priority(tenant_server, "sk-batch", user="chat") == ("batch", 3)  # the key outranks user


def test_user_names_only_configured_tenants(tenant_server):
    key = tenant_server.headers()["Authorization"].removeprefix("Bearer ")  # the server's own key: no tenant
    assert tenant_and_priority(tenant_server, key, user="batch") == ("batch", 3)
    assert tenant_and_priority(tenant_server, key, user="made-up") == ("default", 0)


def test_an_unknown_key_is_still_refused(tenant_server):
    response = httpx.get(f"{tenant_server.url}/v1/models", headers={"Authorization": "Bearer sk-nobody"})
    assert response.status_code == 401


def test_metrics_carry_a_tenant_label_for_configured_tenants_only(tenant_server):
    key = tenant_server.headers()["Authorization"].removeprefix("Bearer ")
    before = scrape(tenant_server)
    for api_key, user in [("sk-chat", None), ("sk-chat", None), (key, "made-up-tenant"), ("sk-batch", None)]:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, **({"user": user} if user else {})}
        response = httpx.post(f"{tenant_server.url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {api_key}"})
        assert response.status_code == 200
    wait_until(lambda: not tenant_server.llm_engine.has_unfinished_requests(), what="the engine to go idle")
    after = scrape(tenant_server)

    def finished(samples, tenant):
        return sample(samples, "iterserve_tenant_requests_finished_total", model_name="tiny", tenant=tenant,
                      finish_reason="length")

    assert [finished(after, t) - finished(before, t) for t in ("chat", "default", "batch")] == [2, 1, 1]
    tenants_seen = {dict(labels).get("tenant") for name, labels in after if name.startswith("iterserve_tenant_")}
    assert tenants_seen == {"chat", "batch", "default"}
    assert sample(after, "iterserve_tenant_time_to_first_token_seconds_count", model_name="tiny", tenant="chat") >= 2


def test_without_a_tenants_file_there_are_no_tenant_series(tiny_server):
    assert not [name for name, _ in scrape(tiny_server) if name.startswith("iterserve_tenant_")]


def test_a_tenants_queue_bound_refuses_only_that_tenant(tiny_model_path, tmp_path, torch_threads):
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS.replace('api_keys = ["sk-batch"]', 'api_keys = ["sk-batch"]\nmax_queued = 1'))
    server = start_server(tiny_model_path, "tiny", num_kv_blocks=64, max_num_seqs=1, tenants=load_tenants(path))
    gate = StepGate(server.llm_engine)
    gate.hold()
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True}
    try:
        with ExitStack() as streams:
            def send(key):
                client = streams.enter_context(httpx.Client(base_url=server.url, timeout=60,
                                                            headers={"Authorization": f"Bearer {key}"}))
                return streams.enter_context(client.stream("POST", "/v1/completions", json=body)).status_code

            assert send("sk-chat") == 200  # takes the one seat
            assert send("sk-batch") == 200  # waits: batch's one place in the queue
            refused = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60,
                                 headers={"Authorization": "Bearer sk-batch"})
            assert refused.status_code == 429 and "batch" in refused.json()["error"]["message"]
            assert refused.headers["Retry-After"].isdigit()
            assert send("sk-chat") == 200  # chat has no bound of its own
            gate.open()
    finally:
        gate.remove()
        server.stop()


def test_tenants_do_not_share_cached_prefixes(tenant_server):
    prompt = "You are a careful assistant who answers in one short sentence. " * 4 + "Name a colour."
    kv_cache = tenant_server.llm_engine.kv_cache

    def hits(key: str) -> int:
        before = kv_cache.prefix_cache_hits
        response = httpx.post(f"{tenant_server.url}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
                              headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        return kv_cache.prefix_cache_hits - before

    hits("sk-chat")
    assert hits("sk-batch") == 0  # no user field: the API key's tenant alone keeps them apart
    assert hits("sk-chat") > 0
