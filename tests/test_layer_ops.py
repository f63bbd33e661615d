"""The fused C++ layer ops compute what their PyTorch reference computes."""

from __future__ import annotations

import pytest
import torch

from quire.kernels import cpu_kernel
from quire.models.layer_ops import FusedLayerOps, TorchLayerOps

pytestmark = pytest.mark.skipif(not cpu_kernel.is_available(), reason="CPU extension did not build")

# float32 must agree to rounding; bfloat16 is compared with float32 math, within two bf16 steps.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ops() -> tuple[TorchLayerOps, FusedLayerOps]:
    return TorchLayerOps(), FusedLayerOps(cpu_kernel.fused_ops())


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp(min=1.0)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_add_rms_norm(ops, dtype, rows):
    ref, fused = ops
    x, residual, weight = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    want, want_residual = ref.add_rms_norm(x, residual.clone(), weight, 1e-5)
    res = residual.to(dtype)
    got, got_residual = fused.add_rms_norm(x.to(dtype), res, weight.to(dtype), 1e-5)
    assert got_residual is res  # updated in place, like vLLM's fused_add_rms_norm
    _close(got_residual, want_residual, dtype)
    _close(got, want, dtype)
    got, same = fused.add_rms_norm(x.to(dtype), None, weight.to(dtype), 1e-5)
    _close(got, ref.add_rms_norm(x, None, weight, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotates_only_the_named_heads(ops, dtype):
    ref, fused = ops
    tokens, heads, dim = 6, 12, 64
    qkv = torch.randn(tokens, 15 * dim)  # 12 q/k heads to rotate, 3 v heads to leave alone
    angles = torch.randn(tokens, dim // 2) * 3
    cos, sin = angles.cos(), angles.sin()
    want = ref.rotate(qkv, ref.rotary_tables(cos, sin, torch.float32), heads, dim)
    mine = qkv.to(dtype)
    got = fused.rotate(mine, fused.rotary_tables(cos, sin, dtype), heads, dim)
    _close(got, want, dtype)
    assert torch.equal(mine[:, heads * dim :], qkv.to(dtype)[:, heads * dim :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8])
def test_silu_and_mul(ops, dtype, rows):
    ref, fused = ops
    gate_up = torch.randn(rows, 2 * 40) * 6  # 40: a 16-lane tail; large |x| reaches the exp limits
    _close(fused.silu_and_mul(gate_up.to(dtype)), ref.silu_and_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("k", "n"), [(576, 960), (40, 7), (70, 13)])
def test_small_linear_matches_matmul(dtype, rows, k, n):
    kernels = cpu_kernel.fused_ops()
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    out = torch.full((rows, n), float("nan"), dtype=dtype)
    kernels.small_linear(x, w, out)
    _close(out, x.double() @ w.double().t(), dtype)


def test_small_linear_rows_do_not_depend_on_the_batch():
    """Each row is reduced in the same order whatever else is in x: batch-invariant."""
    kernels = cpu_kernel.fused_ops()
    x, w = torch.randn(7, 576), torch.randn(100, 576)
    batched = torch.empty(7, 100)
    kernels.small_linear(x, w, batched)
    for row in range(7):
        alone = torch.empty(1, 100)
        kernels.small_linear(x[row : row + 1].contiguous(), w, alone)
        assert torch.equal(alone[0], batched[row])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_every_path_agrees_with_torch(dtype):
    from quire.models.calibration import linear_plan
    from quire.models.linear import Linear

    layer = Linear(576, 192)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(192, 576))
    layer = layer.to(dtype)
    layer.prepare(cpu_kernel.fused_ops())
    plan = linear_plan(cpu_kernel.fused_ops(), dtype)
    for rows in sorted({1, plan.small_rows, plan.small_rows + 1, plan.packed_from, plan.packed_to + 1, 600} - {0}):
        x = torch.randn(rows, 576).to(dtype)
        _close(layer(x), x.double() @ layer.weight.detach().double().t(), dtype)


@pytest.mark.parametrize("vocab", [1, 17, 49152])
def test_argmax_logsumexp_matches_torch_including_ties(vocab):
    kernels = cpu_kernel.fused_ops()
    logits = torch.randn(6, vocab) * 8
    if vocab > 40:
        logits[1, 3] = logits[1, 40] = logits[1].max() + 1  # a tie: the first index wins, as in torch.argmax
    indices, lse = kernels.argmax_logsumexp(logits)
    assert torch.equal(indices, logits.argmax(dim=-1))
    want = logits.double().logsumexp(dim=-1)
    assert ((lse.double() - want).abs() / want.abs().clamp(min=1)).max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_strided_rows_into_their_slots(dtype):
    kernels = cpu_kernel.fused_ops()
    qkv = torch.randn(5, 3 * 2 * 8).to(dtype)  # rows of a fused projection: key and value are strided views
    key, value = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    key_cache, value_cache = torch.zeros(12, 2, 8, dtype=dtype), torch.zeros(12, 2, 8, dtype=dtype)
    slots = torch.tensor([7, 0, 11, 3, 4])
    kernels.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache[slots], key) and torch.equal(value_cache[slots], value)
    untouched = [s for s in range(12) if s not in slots.tolist()]
    assert not key_cache[untouched].any() and not value_cache[untouched].any()
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.write_kv(key, value, key_cache, value_cache, torch.tensor([0, 1, 2, 3, 12]))
