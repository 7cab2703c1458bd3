"""The engine has the collector walk what its load made once, at start-up, not in its first steps."""

import gc

from engine import LLM


def test_the_load_leaves_no_full_collection_pending(tiny_model_path):
    LLM(str(tiny_model_path), dtype="float32", num_kv_blocks=64, max_model_len=256)
    # get_count()[2] counts the middle generation's collections since the last full one,
    # which falls due from ten on: 0 means the engine's own collection was the last full one.
    assert gc.get_count()[2] == 0, gc.get_count()
