"""The engine has the collector walk what its load made once, at start-up, not in its first steps."""

import gc

from engine import LLM


def test_the_engines_start_up_ends_with_a_full_collection(tiny_model_path):
    generations = []

    def record(phase, info):
        if phase == "stop":
            generations.append(info["generation"])

    gc.callbacks.append(record)
    try:
        LLM(str(tiny_model_path), dtype="float32", num_kv_blocks=64, max_model_len=256)
    finally:
        gc.callbacks.remove(record)
    assert generations and generations[-1] == 2, generations[-5:]
