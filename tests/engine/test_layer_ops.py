"""The CPU kernel's fused layer ops equal the torch ones (TorchLayerOps) in every build this CPU runs.

Shapes are chosen to cross the kernels' edges: row lengths that are no multiple of a vector,
strided rows (q and k are a view of the qkv projection), and enough rows to split over threads.
"""

import pytest
import torch

from engine import cpu_kernels
from engine.model import KernelLayerOps, TorchLayerOps

BUILDS = [build.isa for build in cpu_kernels.runnable_builds()]
# float32 differs only in the order of a sum; the narrow dtypes then by a rounding at most.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(params=BUILDS)
def kernel_ops(request) -> KernelLayerOps:
    kernels = cpu_kernels.load(request.param)
    if kernels is None:
        pytest.skip("no compiler here: the engine runs TorchLayerOps")
    return KernelLayerOps(kernels)


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    tolerance = TOLERANCES[dtype]
    return got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=tolerance,
                                                          atol=tolerance)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("rows, width", [(1, 576), (7, 100), (300, 64)])
def test_norms(kernel_ops, dtype, rows, width):
    torch.manual_seed(rows)
    x = (torch.randn(rows, width) * 3).to(dtype)
    weight = torch.randn(width).to(dtype)
    assert close(kernel_ops.rms_norm(x, weight, 1e-5), TorchLayerOps.rms_norm(x, weight, 1e-5), dtype)

    update = torch.randn(rows, width).to(dtype)
    residual, reference_residual = x.clone(), x.clone()
    normed = kernel_ops.add_rms_norm(update, residual, weight, 1e-6)
    assert close(normed, TorchLayerOps.add_rms_norm(update, reference_residual, weight, 1e-6), dtype)
    assert torch.equal(residual, reference_residual), "the residual is summed in place, rounded as torch rounds"


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 9, 3, 64), (5, 4, 2, 80), (200, 12, 4, 128)])
def test_rotation_in_place_of_q_and_k_only(kernel_ops, dtype, tokens, heads, kv_heads, head_dim):
    torch.manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)  # strided rows
    angles = torch.rand(tokens, head_dim // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    expected, values = TorchLayerOps.rotate(qk, cos, sin), qkv[:, qk.shape[1] * head_dim:].clone()
    rotated = kernel_ops.rotate(qk, cos, sin)
    assert rotated.data_ptr() == qk.data_ptr()
    assert close(rotated, expected, dtype)
    assert torch.equal(qkv[:, qk.shape[1] * head_dim:], values), "v is left as it was"


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("rows, width", [(1, 3072), (9, 98), (300, 512)])
def test_silu_and_mul(kernel_ops, dtype, rows, width):
    torch.manual_seed(width)
    gate_up = torch.randn(rows, width) * 4
    # Gates far below -88, where exp(-gate) overflows float: silu is 0 there, not NaN.
    gate_up[0, :8] = torch.tensor([-1e4, -1000.0, -100.0, -88.5, -20.0, 20.0, 100.0, 1000.0])
    gate_up = gate_up.to(dtype)
    assert close(kernel_ops.silu_and_mul(gate_up), TorchLayerOps.silu_and_mul(gate_up), dtype)


def test_bad_inputs_are_refused_not_misread(kernel_ops):
    x, weight = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel_ops.rms_norm(x, weight.double(), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        kernel_ops.rms_norm(x.t(), torch.randn(4), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        kernel_ops.rotate(torch.randn(2, 3, 8), torch.randn(2, 4).double(), torch.randn(2, 4).double())
    with pytest.raises(RuntimeError, match="even number"):
        kernel_ops.silu_and_mul(torch.randn(2, 7))
