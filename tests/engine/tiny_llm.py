"""The offline engine most engine tests run on the tiny random Llama: float32 on the CPU, one
thread, blocks of 4 tokens and a 128-token context, so chunks, block boundaries and
preemption all come within a few tokens."""

from engine import LLM


def make_llm(path, **config) -> LLM:
    config.setdefault("num_kv_blocks", 256)
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=128, block_size=4, num_threads=1, **config)
