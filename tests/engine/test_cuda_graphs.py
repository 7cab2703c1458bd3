"""Static decode steps: padded to buckets, padding confined to the scratch block, same tokens as eager.

Everything but the capture runs on CPU: `StaticDecodeRunner` without `capture` runs the
model on its static buffers directly. The capture itself is tested only where CUDA exists.
"""

import pytest
import torch

from engine import LLM
from engine.cuda_graphs import (
    MAX_GRAPH_SLOTS, StaticDecodeRunner, batch_buckets, context_buckets, pad_decodes, pad_paged_decodes,
)
from engine.input_batch import InputBatch
from scheduler import Request, SamplingParams, ScheduledRequest

BLOCK = 16
MAX_MODEL_LEN = 512
# Contexts from 4 to 251 tokens: the longest crosses from the 256 to the 512 context bucket.
PROMPT_LENGTHS = [3, 17, 60, 120, 250]
MAX_TOKENS = 12


def decode(prompt_len: int, block_ids: list[int], request_id: str = "r") -> ScheduledRequest:
    """A request whose prompt is cached and whose last prompt token is this step's one new token."""
    request = Request(request_id, list(range(100, 100 + prompt_len)), SamplingParams())
    request.num_computed_tokens = prompt_len - 1
    return ScheduledRequest(request, 1, block_ids)


def test_buckets():
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_buckets(1024)[-1] == 256
    assert batch_buckets(256, (3, 24, 40)) == [3, 24, 40]
    assert batch_buckets(32, (3, 24, 40)) == [3, 24, 32]
    assert context_buckets(8192) == [256, 512, 1024, 2048, 4096, 8192]
    assert context_buckets(300) == [256, 300]
    assert context_buckets(100) == [100]


def test_only_pure_decode_steps_within_the_cap_are_bucketed():
    kv_caches = torch.zeros(1, 2, 9 * BLOCK, 1, 4)
    runner = StaticDecodeRunner(None, kv_caches, BLOCK, max_batch=256, max_context=8192, capture=False)
    assert runner.scratch_block == 8
    assert runner.bucket([decode(10, [0]) for _ in range(5)]) == (8, 256)
    assert runner.bucket([decode(10, [0]), decode(300, [0] * 19)]) == (2, 512)
    mixed = [decode(10, [0]), ScheduledRequest(Request("p", [1, 2, 3], SamplingParams()), 3, [1])]
    assert runner.bucket(mixed) is None
    assert runner.bucket([]) is None
    too_wide = [decode(4000, [0] * 250) for _ in range(200)]  # 256 rows * 4096 slots
    assert 256 * 4096 > MAX_GRAPH_SLOTS and runner.bucket(too_wide) is None


def test_padding_rows_write_and_read_only_the_scratch_slot():
    block, scratch_block = 4, 9
    scratch_slot = scratch_block * block
    decodes = [decode(3, [5], "a"), decode(6, [2, 7], "b")]  # positions 2 and 5
    inputs = pad_decodes(decodes, batch=4, context=8, block_size=block, scratch_block=scratch_block,
                         input_batch=InputBatch(block))

    assert inputs.positions.tolist() == [2, 5, 0, 0]
    assert inputs.input_ids.tolist() == [102, 105, 0, 0]
    assert inputs.slot_mapping.tolist() == [5 * block + 2, 7 * block + 1, scratch_slot, scratch_slot]
    # Real rows: their own blocks, then the scratch block for the lanes past their table.
    assert inputs.slots[0].tolist() == [20, 21, 22, 23] + [scratch_slot + i for i in range(4)]
    assert inputs.slots[1].tolist() == [8, 9, 10, 11, 28, 29, 30, 31]
    mask = inputs.mask.view(4, 8)
    assert mask[0].tolist() == [True] * 3 + [False] * 5
    assert mask[1].tolist() == [True] * 6 + [False] * 2
    for row in (2, 3):
        # One visible slot, not none: a fully masked row would make softmax NaN.
        assert mask[row].tolist() == [True] + [False] * 7
        assert inputs.slots[row, 0] == scratch_slot
        assert (inputs.slots[row] // block == scratch_block).all()


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def generate(path, static: bool, dtype: str = "float32", batch_sizes=None, **config):
    llm = LLM(str(path), dtype=dtype, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, **config)
    runner = llm.engine.runner
    keys = []
    if static:
        runner.use_static_decode(llm.engine.config.max_num_seqs, MAX_MODEL_LEN, capture=False,
                                 batch_sizes=batch_sizes)
        run = runner.static_decode.run

        def recording_run(decodes, key, pending=None):
            keys.append(key)
            return run(decodes, key, pending)

        runner.static_decode.run = recording_run
    outputs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outputs], runner.kv_caches, keys


def written_slots(kv_caches: torch.Tensor) -> torch.Tensor:
    """Per slot, whether any layer's key or value there is non-zero (the cache starts zeroed)."""
    return kv_caches.float().abs().amax(dim=(0, 1, 3, 4)) > 0


# bfloat16 takes the matmul decode path (CUDA's default dtype), where a fully masked
# padding row would turn NaN and spread through the scratch block to real rows. In float32
# the static path attends by gather and SDPA, the eager one by the C++ kernel, with other
# summation orders: 2e-7 apart on an idle host, once over 1e-5 on a loaded one (a fresh-clone
# .ci/run beside a soak). A padding row writing a real slot would be off by ~0.1.
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_padded_static_decode_matches_eager(tiny_model_path, dtype, tolerance):
    eager_tokens, eager_kv, _ = generate(tiny_model_path, static=False, dtype=dtype)
    static_tokens, static_kv, keys = generate(tiny_model_path, static=True, dtype=dtype)

    # The first step prefills (eager); every later one is five decodes padded to eight rows.
    assert keys == [(8, 256)] * 6 + [(8, 512)] * 5
    assert static_tokens == eager_tokens

    scratch = slice(64 * BLOCK, 65 * BLOCK)
    real = slice(0, 64 * BLOCK)
    eager_written, static_written = written_slots(eager_kv), written_slots(static_kv)
    assert not eager_written[scratch].any(), "the eager path never touches the scratch block"
    assert static_written[scratch].tolist() == [True] + [False] * (BLOCK - 1), "padding rows wrote its first slot"
    # Padding wrote nowhere else: the same real slots hold the same keys and values.
    assert torch.equal(static_written[real], eager_written[real])
    assert torch.isfinite(static_kv).all()
    static_real, eager_real = static_kv[:, :, real].float(), eager_kv[:, :, real].float()
    assert torch.allclose(static_real, eager_real, atol=tolerance, rtol=tolerance), \
        f"largest difference {(static_real - eager_real).abs().max().item():.3g}"


def test_padded_static_decode_over_a_narrow_cache(tiny_model_path):
    """--kv-cache-dtype fp8_e5m2: the static path reads and writes the float8 cache as the eager one does."""
    eager_tokens, eager_kv, _ = generate(tiny_model_path, static=False, kv_cache_dtype="fp8_e5m2")
    static_tokens, static_kv, keys = generate(tiny_model_path, static=True, kv_cache_dtype="fp8_e5m2")
    assert static_kv.dtype == torch.float8_e5m2 and keys
    assert static_tokens == eager_tokens
    real = slice(0, 64 * BLOCK)
    assert torch.equal(written_slots(static_kv)[real], written_slots(eager_kv)[real])
    # The two attend in other summation orders, so a value may round to the neighbouring float8.
    differing = (static_kv[:, :, real].view(torch.uint8) != eager_kv[:, :, real].view(torch.uint8)).float().mean()
    assert differing < 0.01


def test_planned_batch_sizes_are_the_ones_padded_to(tiny_model_path):
    """Sizes from `--cuda-graph-sizes` (or planned by auto): five decodes run at 6 rows, not 8."""
    eager_tokens, _, _ = generate(tiny_model_path, static=False)
    static_tokens, _, keys = generate(tiny_model_path, static=True, batch_sizes=(3, 6))
    assert keys == [(6, 256)] * 6 + [(6, 512)] * 5
    assert static_tokens == eager_tokens


def test_on_the_triton_backend_steps_are_padded_in_rows_alone(tiny_model_path):
    """The Triton kernel reads lengths and block tables from the buffers, so one key per batch
    size serves every context (the 256 -> 512 crossing above takes no new one), and padding
    rows write nothing at all."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it)")
    eager_tokens, eager_kv, _ = generate(tiny_model_path, static=False, attention_backend="triton")
    static_tokens, static_kv, keys = generate(tiny_model_path, static=True, attention_backend="triton")
    assert keys == [(8, 1)] * 11  # (batch, KV splits): one split on CPU
    assert static_tokens == eager_tokens
    assert not written_slots(static_kv)[64 * BLOCK:].any(), "padding rows wrote the scratch block"
    assert torch.equal(written_slots(static_kv), written_slots(eager_kv))
    assert torch.allclose(static_kv, eager_kv, atol=1e-5, rtol=1e-5)


def test_paged_padding_rows_attend_one_scratch_slot_and_store_nowhere():
    block, scratch_block = 4, 9
    decodes = [decode(3, [5], "a"), decode(6, [2, 7], "b")]  # positions 2 and 5
    inputs = pad_paged_decodes(decodes, batch=4, block_size=block, scratch_block=scratch_block,
                               input_batch=InputBatch(block))
    assert inputs.positions.tolist() == [2, 5, 0, 0]
    assert inputs.slot_mapping.tolist() == [5 * block + 2, 7 * block + 1, -1, -1]
    assert inputs.seq_lens.tolist() == [3, 6, 1, 1]
    assert inputs.block_tables.tolist() == [[5, 9], [2, 7], [9, 9], [9, 9]]


def test_cuda_graphs_need_a_cuda_device(tiny_model_path):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        LLM(str(tiny_model_path), device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend, num_graphs", [("torch", 2), ("triton", 1)])
def test_captured_graphs_replay_the_eager_tokens(tiny_model_path, backend, num_graphs):
    eager_tokens, _, _ = generate(tiny_model_path, static=False, device="cuda", attention_backend=backend)
    llm = LLM(str(tiny_model_path), dtype="float32", device="cuda", num_kv_blocks=64,
              max_model_len=MAX_MODEL_LEN, cuda_graphs=True, attention_backend=backend)
    outputs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outputs] == eager_tokens
    # One graph per key, captured on first use and replayed after: on the gather path one per
    # context bucket crossed, on the Triton path one for every context.
    assert llm.engine.runner.static_decode.num_graphs == num_graphs
