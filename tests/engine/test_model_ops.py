"""The fused and packed CPU ops of engine/model.py against the plain computations they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import LLM, host
from engine.model import PackedLinear, RMSNorm, bucket_rows, pack_linears_for_cpu
from scheduler import SamplingParams

needs_onednn = pytest.mark.skipif(
    not host.current().cpu.onednn_packs_bfloat16,
    reason="oneDNN packs bfloat16 weights only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT (and a torch built with it)")


needs_onednn_float32 = pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not host.current().cpu.is_x86,
                                          reason="oneDNN packs float32 weights on x86 (and a torch built with it)")


# The weight is packed for 64 rows; any count must work, padded to its bucket (37, 300, 1001) or not.
@pytest.mark.parametrize("rows", [1, 3, 37, 64, 300, 1001])
@pytest.mark.parametrize("dtype, rtol, atol", [
    pytest.param(torch.bfloat16, 2 ** -7, 1e-3, marks=needs_onednn),
    # Every host with oneDNN checks the float32 packing, whether or not its engine chooses it.
    pytest.param(torch.float32, 1e-5, 1e-5, marks=needs_onednn_float32),
])
def test_packed_linear_matches_linear(rows, dtype, rtol, atol):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 96, dtype=dtype)
    out = packed(x)
    # oneDNN blocks by shape, so a last-bit difference from the unpadded product is allowed.
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=rtol, atol=atol)
    # What fills the bucket's other rows never reaches the real ones.
    others = 100 * torch.randn(bucket_rows(rows) - rows, 96, dtype=dtype)
    assert torch.equal(packed(torch.cat([x, others]))[:rows], out)


def test_bucket_rows_pads_little_and_meets_few_shapes():
    buckets = [bucket_rows(rows) for rows in range(1, 2049)]
    assert buckets[:32] == list(range(1, 33))
    assert all(rows <= padded <= rows * 17 / 16 for rows, padded in enumerate(buckets, start=1))
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))
    assert all(bucket_rows(padded) == padded for padded in buckets)  # a bucket is its own bucket
    assert len(set(buckets)) == 32 + 16 * 6  # exact to 32, then 16 per power of two up to 2,048


@needs_onednn
def test_pack_linears_swaps_every_linear_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.SiLU(), nn.Sequential(nn.Linear(64, 8))).to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    expected = model(x)
    pack_linears_for_cpu(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_rms_norm_matches_the_reference_formula(dtype, tolerance):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48)
    norm = norm.to(dtype)
    x = torch.randn(7, 48, dtype=dtype) * 3
    x32 = x.float()
    # Hugging Face Llama: normalise in float32, round to the dtype, then apply the weight.
    reference = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.allclose(norm(x).float(), reference.float(), rtol=tolerance, atol=tolerance)


def bfloat16_engine(path) -> LLM:
    return LLM(str(path), dtype="bfloat16", device="cpu", num_kv_blocks=64, max_model_len=256)


def test_bfloat16_without_onednn_packing_runs_plain_linears(tiny_model_path, cpu_without):
    """As on a CPU without AVX-512: no packing, F.linear in bfloat16, and the engine still generates."""
    cpu_without("avx512bw", "avx_ne_convert")
    llm = bfloat16_engine(tiny_model_path)
    assert llm.engine.paths["linear"] == "F.linear"
    assert not any(isinstance(m, PackedLinear) for m in llm.engine.runner.model.modules())
    outputs = llm.generate(["The capital of France is", "1, 2, 3,"],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [8, 8]


@needs_onednn
def test_packed_and_plain_bfloat16_engines_agree(tiny_model_path, cpu_without):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    packed = bfloat16_engine(tiny_model_path)
    assert packed.engine.paths["linear"] == "onednn-packed"
    packed_tokens = [o.token_ids for o in packed.generate(prompts, params)]
    cpu_without("avx512bw", "avx_ne_convert")
    plain = bfloat16_engine(tiny_model_path)
    assert [o.token_ids for o in plain.generate(prompts, params)] == packed_tokens


@needs_onednn_float32
def test_packed_and_plain_float32_engines_agree(tiny_model_path, monkeypatch):
    """Both float32 paths on every x86 host with oneDNN, whichever this one's engine chooses."""
    import engine.loader

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    tokens = {}
    for path in ("onednn-packed", "F.linear"):
        monkeypatch.setattr(engine.loader, "linear_path", lambda dtype, device, path=path: path)
        llm = LLM(str(tiny_model_path), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=256)
        assert any(isinstance(m, PackedLinear) for m in llm.engine.runner.model.modules()) == (path != "F.linear")
        tokens[path] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["onednn-packed"] == tokens["F.linear"]
