"""--kv-cache-dtype through the command line and an engine process: the server reports the cache it got."""

import argparse

import httpx

from server.engine_args import add_engine_arguments, engine_config
from server_harness import start_server


def test_the_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config(parser.parse_args([])).kv_cache_dtype == "auto"
    assert engine_config(parser.parse_args(["--dtype", "float32", "--kv-cache-dtype", "bfloat16"])).kv_cache_dtype \
        == "bfloat16"


def test_the_flag_offers_what_the_engine_and_the_roofline_know():
    """The flag's choices are written out so that parsing imports no torch; they must not drift."""
    from engine.loader import KV_CACHE_DTYPES
    from scheduler.roofline import KV_CACHE_BYTES

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    [flag] = [action for action in parser._actions if action.dest == "kv_cache_dtype"]
    assert flag.choices == ["auto", *KV_CACHE_DTYPES]
    assert set(KV_CACHE_BYTES) == set(KV_CACHE_DTYPES)


def test_a_server_with_an_fp8_cache_under_a_float32_model(tiny_model_path, torch_threads):
    server = start_server(tiny_model_path, "tiny", engine_core="process",
                          engine_args={"dtype": "float32", "kv_cache_dtype": "fp8_e5m2"})
    try:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            version = http.get("/version").json()
            assert version["dtype"] == "float32"
            assert version["kv_cache"]["dtype"] == "fp8_e5m2", "as the flag spells it"
            completion = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
            assert completion.status_code == 200, completion.text
            assert completion.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
