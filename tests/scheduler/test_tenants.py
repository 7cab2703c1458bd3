"""The tenants file: what it accepts, what it refuses (naming the field), and whom a request belongs to."""

import pytest

from scheduler.tenants import DEFAULT_TENANT, Tenant, TenantsError, load_tenants

GOOD = """
[tenants.chat]
weight = 2
priority = 0
api_keys = ["sk-chat"]

[tenants.batch]
priority = 1
slo_ttft_ms = 30000
slo_tpot_ms = 500.5
max_kv_fraction = 0.5
tokens_per_minute = 60000
"""


def write(tmp_path, text):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def test_a_tenants_file_is_read_with_defaults_and_the_default_tenant(tmp_path):
    tenants = load_tenants(write(tmp_path, GOOD))
    assert tenants.by_name == {DEFAULT_TENANT: Tenant(DEFAULT_TENANT), "chat": Tenant("chat", 2.0, 0, ("sk-chat",)),
                               "batch": Tenant("batch", 1.0, 1, slo_ttft_ms=30000, slo_tpot_ms=500.5,
                                               max_kv_fraction=0.5, tokens_per_minute=60000)}
    assert tenants.weights == {DEFAULT_TENANT: 1.0, "chat": 2.0, "batch": 1.0}
    assert tenants.by_api_key() == {"sk-chat": "chat"}
    assert tenants.kv_fractions == {"batch": 0.5}
    assert tenants.is_configured


def test_a_request_belongs_to_its_keys_tenant_else_the_one_its_user_names_else_default(tmp_path):
    tenants = load_tenants(write(tmp_path, GOOD))
    assert tenants.resolve("chat", "batch").name == "chat"
    assert tenants.resolve(None, "batch").name == "batch"
    assert tenants.resolve(None, "someone-new").name == DEFAULT_TENANT  # no minting of tenants
    assert tenants.resolve(None, None).name == DEFAULT_TENANT


@pytest.mark.parametrize("text,message", [
    ("[tenants.a]\nweight = 0\n", "weight must be a positive number"),
    ("[tenants.a]\nweight = true\n", "weight must be a positive number"),
    ("[tenants.a]\npriority = 1.5\n", "priority must be an integer"),
    ("[tenants.a]\nslo_ttft = 100\n", "unknown keys \\['slo_ttft'\\]"),
    ("[tenants.a]\nslo_ttft_ms = 0\n", "slo_ttft_ms must be a positive number of milliseconds"),
    ("[tenants.a]\nslo_tpot_ms = '50'\n", "slo_tpot_ms must be a positive number"),
    ("[tenants.a]\nmax_kv_fraction = 1.5\n", "max_kv_fraction must be in \\(0, 1\\]"),
    ("[tenants.a]\ntokens_per_minute = 0\n", "tokens_per_minute must be a positive integer"),
    ("[tenants.a]\nmax_queued = -1\n", "max_queued must be a non-negative integer"),
    ("[tenants.a]\nmax_queued = 2.5\n", "max_queued must be a non-negative integer"),
    ("[tenants.a]\napi_keys = 'k'\n", "api_keys must be a list"),
    ("[tenants.a]\napi_keys = ['k']\n[tenants.b]\napi_keys = ['k']\n", "listed for 'a' too"),
    ("[other]\nx = 1\n", "unknown top-level keys"),
    ("[tenants.a\n", "tenants.toml"),
])
def test_a_bad_tenants_file_is_refused_with_the_field(tmp_path, text, message):
    with pytest.raises(TenantsError, match=message):
        load_tenants(write(tmp_path, text))
