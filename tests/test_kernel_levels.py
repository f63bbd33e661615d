"""Every ISA level this CPU runs computes every op of fused_ops.cpp as a float64 reference does.

Each level is its own library (``cpu_kernel.kernels(level)``): ``scalar`` is the reference loops,
``avx2`` the portable Vectorized<float> paths, the AVX-512 levels the hand-written ones. Shapes
have tails for 4, 8 and 16 lanes; weights are synthetic random GGUF blocks.
"""

from __future__ import annotations

import pytest
import torch

from quire.kernels import cpu_kernel
from quire.models.block_format import pack_quantized

KINDS = {"q4_1": 0, "q8_0": 1}
BF16_STEP = 2.0**-8  # one bf16 rounding, relative


@pytest.fixture(scope="module", params=cpu_kernel.isa_levels())
def ops(request):
    kernels = cpu_kernel.kernels(request.param)
    if kernels is None:
        pytest.skip(f"the {request.param} kernels did not build")
    return kernels


def _assert_one_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, magnitude=None) -> None:
    """got (dtype) is the float64 value `want` up to float32 arithmetic and, in bf16, one rounding."""
    assert got.dtype == dtype and got.shape == want.shape
    scale = (want.abs() if magnitude is None else magnitude).max().clamp(min=1e-30)
    bound = 1e-5 * scale + (want.abs() * BF16_STEP if dtype == torch.bfloat16 else 0)
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (3, 37), (2, 5)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(ops, dtype, rows, dim, with_residual):
    gen = torch.Generator().manual_seed(rows * dim)
    x, weight = torch.randn(rows, dim, generator=gen).to(dtype), torch.randn(dim, generator=gen).to(dtype)
    residual = torch.randn(rows, dim, generator=gen).to(dtype) if with_residual else None
    before = residual.clone() if with_residual else None
    out = ops.add_rms_norm(x, residual, weight, 1e-5)
    h = x.double()
    if with_residual:
        # The residual is the sum rounded to dtype, and the norm is taken of that rounded sum.
        _assert_one_rounding(residual, x.double() + before.double(), dtype)
        h = residual.double()
    want = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    _assert_one_rounding(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 20, 6])  # half 32, 10, 3
def test_rotary_inplace(ops, dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    tokens, heads, total = 5, 3, 4  # 3 heads rotated, the 4th left alone
    x = torch.randn(tokens, total * head_dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, head_dim // 2, generator=gen) * 3
    cos, sin = angles.cos(), angles.sin()
    before = x.clone()
    ops.rotary_inplace(x, cos, sin, heads, head_dim)
    h = before.double()[:, : heads * head_dim].view(tokens, heads, head_dim)
    x1, x2 = h[..., : head_dim // 2], h[..., head_dim // 2 :]
    c, s = cos.double()[:, None], sin.double()[:, None]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).view(tokens, -1)
    _assert_one_rounding(x[:, : heads * head_dim], want, dtype, magnitude=h.abs().view(tokens, -1) * 2)
    assert torch.equal(x[:, heads * head_dim :], before[:, heads * head_dim :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 576), (3, 40), (2, 13), (1, 3)])
def test_silu_and_mul(ops, dtype, rows, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * 6).to(dtype)
    gate_up[0, 0] = -100.0  # exp(-g) beyond float32's range: silu -> -0
    out = ops.silu_and_mul(gate_up)
    g, u = gate_up.double()[:, :inter], gate_up.double()[:, inter:]
    want = g * torch.sigmoid(g) * u
    # exp(-g) = 2^(-g log2 e): the float32 product's rounding grows with |g| (~1e-6 at |g| = 15),
    # the polynomial adds ~1e-7. Elementwise bounds, not the row maximum.
    bound = want.abs() * (1e-7 * (g.abs() + 2) + (BF16_STEP if dtype == torch.bfloat16 else 0)) + 1e-30
    assert out.dtype == dtype and ((out.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("k", "n"), [(576, 37), (70, 13), (9, 5)])
def test_small_linear(ops, dtype, rows, k, n):
    gen = torch.Generator().manual_seed(rows * k + n)
    x, w = torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    out = torch.full((rows, n), float("nan"), dtype=dtype)
    ops.small_linear(x, w, out)
    magnitude = x.double().abs() @ w.double().abs().t()
    _assert_one_rounding(out, x.double() @ w.double().t(), dtype, magnitude=magnitude)


@pytest.mark.parametrize("vocab", [1, 7, 17, 40, 100, 49152])
def test_argmax_logsumexp_first_index_of_the_maximum(ops, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=gen) * 8
    top = logits.max() + 1
    if vocab >= 40:
        logits[1, 3] = logits[1, 11] = top  # a tie in two lanes of one vector (8 or 16 lanes)
        logits[2, 5] = logits[2, 5 + 16] = top  # the same lane of two vectors
        logits[3, 9] = logits[3, 2] = top  # the later lane holds the later index only
        logits[4, vocab - 1] = top  # the maximum in the tail
        logits[5, 0] = logits[5, vocab - 1] = top  # the first element against the tail
        logits[7, 9] = logits[7, 17] = top  # vectors 1 and 2 of 8 lanes (kept in separate accumulators)
    logits[6] = 0.5  # every element ties
    indices, lse = ops.argmax_logsumexp(logits)
    assert torch.equal(indices, logits.argmax(dim=-1))
    want = logits.double().logsumexp(dim=-1)
    assert ((lse.double() - want).abs() / want.abs().clamp(min=1)).max() < 1e-6


def _random_blocks(kind: str, n: int, k_blocks: int, seed: int) -> torch.Tensor:
    """Random GGUF blocks [n, k_blocks * block bytes] with realistic scales (Q4_1's m ~ -8 d)."""
    gen = torch.Generator().manual_seed(seed)
    block_bytes = 20 if kind == "q4_1" else 34
    blocks = torch.randint(0, 256, (n, k_blocks, block_bytes), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k_blocks, 2, generator=gen) * 0.02 + 0.001
    scales[..., 1] *= -8
    blocks[..., 0:4] = scales.half().view(torch.uint8).view(n, k_blocks, 4)
    return blocks.view(n, -1)


def _expand(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The blocks' weights in float64, as gguf defines them (Q4_1: d q + m, Q8_0: d q)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, 20 if kind == "q4_1" else 34)
    d = b[..., 0:2].contiguous().view(torch.float16).double()
    if kind == "q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).double()
        q = b[..., 4:].long()
        q = torch.cat([q & 0x0F, q >> 4], dim=-1).double()  # weight j low nibble, j + 16 high
        return (d * q + m).view(n, -1)
    q = b[..., 2:].contiguous().view(torch.int8).double()
    return (d * q).view(n, -1)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_dequantize_blocks(ops, kind):
    blocks = _random_blocks(kind, 21, 3, seed=1)
    got = ops.dequantize_blocks(blocks, KINDS[kind], 96)
    assert torch.equal(got.double(), _expand(blocks, kind))


@pytest.fixture(scope="module")
def quant_weights():
    # N = 45: three row groups (the last unit has one, 13 of its 16 rows used); K = 224: a panel
    # chunk of 192 and a remainder of 32.
    out = {}
    for kind in KINDS:
        blocks = _random_blocks(kind, 45, 7, seed=7)
        out[kind] = (pack_quantized(blocks, kind), _expand(blocks, kind))
    return out


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 13, 17, 40, 64, 113])
def test_quant_linear(ops, quant_weights, kind, rows):
    packed, weight = quant_weights[kind]
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
    out = ops.quant_linear(x, packed, KINDS[kind], weight.shape[0])
    want = x.double() @ weight.t()
    assert out.shape == want.shape
    # The same weights, float32 rounding in another order and no more.
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 16, 17, 33, 64, 200])
def test_quant_linear_bf16_is_the_float_product_rounded_once(ops, quant_weights, kind, rows):
    """bf16 x: the float32 product rounded once; from the row count the level reports on (AMX or
    the AVX512-BF16 panel), of the weights rounded to bf16 (exact products, float32 sums)."""
    packed, weight = quant_weights[kind]
    bf16_from = ops.quant_linear_bf16_rows()
    if bf16_from and rows >= bf16_from:
        weight = weight.to(torch.bfloat16).double()
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    out = ops.quant_linear(x, packed, KINDS[kind], weight.shape[0])
    want = x.double() @ weight.t()
    _assert_one_rounding(out, want, torch.bfloat16, magnitude=x.double().abs() @ weight.abs().t())


def test_only_levels_with_vdpbf16ps_multiply_bf16_weights(ops):
    level = cpu_kernel.level_of(ops)
    assert (ops.quant_linear_bf16_rows() > 0) == (level in ("avx512_bf16", "amx"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(ops, dtype):
    qkv = torch.randn(5, 3 * 2 * 8).to(dtype)
    key, value = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    key_cache, value_cache = torch.zeros(12, 2, 8, dtype=dtype), torch.zeros(12, 2, 8, dtype=dtype)
    slots = torch.tensor([7, 0, 11, 3, 4])
    ops.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache[slots], key) and torch.equal(value_cache[slots], value)
