"""GGUF block-format weights: expanded exactly to the float32 values, products equal to the float path."""

from __future__ import annotations

import sys

import pytest
import torch

from quire.kernels import cpu_kernel
from quire.models.block_format import pack_quantized
from quire.models.calibration import LinearPlan, linear_plan, onednn_available
from quire.models.linear import Linear
from quire.models.loader import default_model_path, load_model_files

pytestmark = pytest.mark.skipif(not cpu_kernel.is_available(), reason="CPU extension did not build")

KINDS = {"q4_1": 0, "q8_0": 1}


@pytest.fixture(scope="module")
def loaded():
    return load_model_files(default_model_path())


def test_default_model_keeps_block_copies_of_every_linear_weight(loaded):
    names = set(loaded.quantized)
    assert "model.embed_tokens.weight" in names  # Q8_0, the tied LM head
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert {q.kind for q in loaded.quantized.values()} == {"q4_1", "q8_0"}


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # rows permuted back from llama.cpp's rotary layout
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ],
)
def test_blocks_expand_to_exactly_the_float_weights(loaded, name):
    quantized, weight = loaded.quantized[name], loaded.weights[name]
    expanded = cpu_kernel.fused_ops().dequantize_blocks(quantized.blocks, KINDS[quantized.kind], weight.shape[1])
    assert torch.equal(expanded, weight)


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 8, 9, 17, 40, 64, 112])
@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.mlp.gate_proj.weight",  # Q4_1, 3072 rows
        "model.layers.5.mlp.down_proj.weight",  # Q4_1, K = 1536
        "model.embed_tokens.weight",  # Q8_0, the LM head
    ],
)
def test_quant_linear_equals_the_float_product(loaded, name, rows):
    quantized, weight = loaded.quantized[name], loaded.weights[name]
    blocks = quantized.blocks
    if weight.shape[0] > 4096:
        weight, blocks = weight[:1000], blocks[:1000]  # keep the test quick; 1000 % 16 != 0
    x = torch.randn(rows, weight.shape[1])
    packed = pack_quantized(blocks, quantized.kind)
    out = cpu_kernel.fused_ops().quant_linear(x, packed, KINDS[quantized.kind], weight.shape[0])
    want = x.double() @ weight.double().t()
    # The same weights, float32 rounding in another order and no more: up to 8 rows summed per
    # block as d * sum(q x) (+ m' sum x), from 9 rows over the expanded weights in K chunks of 192.
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("k_blocks", [3, 7, 13])  # K = 96, 224, 416: K chunks of 192 and a remainder
@pytest.mark.parametrize("rows", [1, 9, 13, 30])
def test_quant_linear_with_k_not_a_multiple_of_the_panel_chunk(kind, k_blocks, rows):
    gen = torch.Generator().manual_seed(rows * 100 + k_blocks)
    block_bytes = 20 if kind == "q4_1" else 34
    n = 40  # two and a half row groups
    blocks = torch.randint(0, 256, (n, k_blocks, block_bytes), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k_blocks, 2, generator=gen) * 0.02 + 0.001
    scales[..., 1] *= -8  # Q4_1's m, around -8 d as in real blocks
    blocks[..., 0:4] = scales.half().view(torch.uint8).view(n, k_blocks, 4)
    blocks = blocks.view(n, -1)
    weight = cpu_kernel.fused_ops().dequantize_blocks(blocks, KINDS[kind], 32 * k_blocks)
    x = torch.randn(rows, 32 * k_blocks, generator=gen)
    out = cpu_kernel.fused_ops().quant_linear(x, pack_quantized(blocks, kind), KINDS[kind], n)
    want = x.double() @ weight.double().t()
    assert out.shape == (rows, n)
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def bf16_weight_rows() -> int:
    """From how many rows the engine's quant_linear multiplies bf16 x by the bf16-rounded weights
    (the AMX tile unit or the AVX512-BF16 panel), 0 if never: the kernels report it."""
    return cpu_kernel.fused_ops().quant_linear_bf16_rows() if cpu_kernel.is_available() else 0


needs_bf16_weights = pytest.mark.skipif(
    bf16_weight_rows() == 0, reason="no bf16 block path (AMX or AVX512-BF16) on this CPU"
)


def assert_bf16_product(out, x, weight_bf16):
    """One bf16 rounding of a float32 sum of exact bf16 products, nothing more."""
    want = x.double() @ weight_bf16.double().t()
    magnitude = x.double().abs() @ weight_bf16.double().abs().t()
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert ((out.double() - want).abs() <= want.abs() * 2**-8 + magnitude * 1e-6).all()


def assert_bf16_block_product(out, x, weight):
    """The bf16 block path's product for x's row count: of the bf16 weights from bf16_weight_rows()
    rows on, else the float32 product of the exact weights rounded once."""
    if x.shape[0] >= bf16_weight_rows():
        assert_bf16_product(out, x, weight.to(torch.bfloat16))
        return
    exact = x.double() @ weight.double().t()
    magnitude = x.double().abs() @ weight.double().abs().t()
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + magnitude * 1e-6).all()


@needs_bf16_weights
@pytest.mark.parametrize("rows", [5, 9, 16, 17, 33, 64, 200])
@pytest.mark.parametrize(
    "name",
    ["model.layers.0.mlp.gate_proj.weight", "model.layers.5.mlp.down_proj.weight", "model.embed_tokens.weight"],
)
def test_bf16_quant_linear_uses_the_bf16_weights(loaded, name, rows):
    quantized, weight = loaded.quantized[name], loaded.weights[name]
    blocks = quantized.blocks
    if weight.shape[0] > 4096:
        weight, blocks = weight[:1000], blocks[:1000]
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    out = cpu_kernel.fused_ops().quant_linear(x, pack_quantized(blocks, quantized.kind), KINDS[quantized.kind],
                                              weight.shape[0])
    assert_bf16_block_product(out, x, weight)


@needs_bf16_weights
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
# The panel's K chunks (at most 384): K = 224 one; 416 two uneven (7 + 6 blocks); 1184 four (10 x 3 + 7)
@pytest.mark.parametrize("k_blocks", [7, 13, 37])
# AMX: 30, 47 are a pair of x tiles and a pair and a single; the panel: one register tile of up to
# 12 rows, then near-equal tiles (17 = 9 + 8, 200 = 13 x 12 + 4 x 11)
@pytest.mark.parametrize("rows", [5, 9, 16, 17, 30, 33, 47, 64, 200])
def test_bf16_block_path_with_odd_shapes(kind, k_blocks, rows):
    gen = torch.Generator().manual_seed(rows * 100 + k_blocks)
    block_bytes = 20 if kind == "q4_1" else 34
    n = 40  # a unit with one row group, 8 columns of it used
    blocks = torch.randint(0, 256, (n, k_blocks, block_bytes), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k_blocks, 2, generator=gen) * 0.02 + 0.001
    scales[..., 1] *= -8
    blocks[..., 0:4] = scales.half().view(torch.uint8).view(n, k_blocks, 4)
    blocks = blocks.view(n, -1)
    weight = cpu_kernel.fused_ops().dequantize_blocks(blocks, KINDS[kind], 32 * k_blocks)
    x = torch.randn(rows, 32 * k_blocks, generator=gen).to(torch.bfloat16)
    out = cpu_kernel.fused_ops().quant_linear(x, pack_quantized(blocks, kind), KINDS[kind], n)
    assert_bf16_block_product(out, x, weight)


@needs_bf16_weights
def test_bf16_rows_below_the_bf16_path_keep_the_exact_weights():
    """Under the reported row count the product is of the GGUF weights, not their bf16 rounding."""
    rows = bf16_weight_rows() - 1
    if rows == 0:
        pytest.skip("the bf16 path serves every row count")
    kind, n, k_blocks = "q8_0", 48, 6
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (n, k_blocks, 34), dtype=torch.uint8, generator=gen)
    blocks[..., 0:2] = (torch.rand(n, k_blocks, 1, generator=gen) * 0.02 + 0.001).half().view(torch.uint8)
    blocks = blocks.view(n, -1)
    x = torch.randn(rows, 32 * k_blocks, generator=gen).to(torch.bfloat16)
    out = cpu_kernel.fused_ops().quant_linear(x, pack_quantized(blocks, kind), KINDS[kind], n)
    assert torch.equal(out, cpu_kernel.fused_ops().quant_linear(x.float(), pack_quantized(blocks, kind),
                                                                 KINDS[kind], n).to(torch.bfloat16))


def test_packing_a_row_count_that_is_not_a_multiple_of_16_pads_with_zero_rows():
    blocks = torch.randint(0, 256, (5, 2 * 20), dtype=torch.uint8)
    packed = pack_quantized(blocks, "q4_1")
    assert packed.shape == (1, 2, 320)
    # Row 3's block 1: its fp16 d at bytes 6..8, m at 32 + 6..8, quant byte c at 64 + 16 c + 3.
    row_block = blocks.view(5, 2, 20)[3, 1]
    assert packed[0, 1, 6:8].tolist() == row_block[0:2].tolist()
    assert packed[0, 1, 38:40].tolist() == row_block[2:4].tolist()
    assert packed[0, 1, 64 + 3 :: 16].tolist() == row_block[4:].tolist()
    padding = packed[0, :, 64:].view(2, 16, 16)[:, :, 5:]  # [block, chunk, row]: rows 5..15
    assert not packed[0, :, 10:32].any() and not packed[0, :, 42:64].any() and not padding.any()


def _o_proj(loaded) -> Linear:
    name = "model.layers.0.self_attn.o_proj.weight"
    layer = Linear(576, 576)
    with torch.no_grad():
        layer.weight.copy_(loaded.weights[name])
    layer.quantized = loaded.quantized[name]
    return layer


def test_linear_follows_this_machines_plan(loaded):
    kernels = cpu_kernel.fused_ops()
    for dtype in (torch.float32, torch.bfloat16):
        plan = linear_plan(kernels, dtype)
        assert plan == linear_plan(kernels, dtype)  # measured once, then read from the cache
        layer = _o_proj(loaded).to(dtype)
        layer.prepare(kernels)
        assert layer._quant_rows == plan.quant_rows and layer._small_rows == plan.small_rows
        assert (layer._packed is None) == (not plan.packed_range() or plan.packed_to <= plan.quant_rows)


@pytest.mark.parametrize("quant_rows", [0, 8, 64, sys.maxsize])
def test_every_path_a_plan_can_choose_gives_the_gguf_product(loaded, quant_rows):
    """Whatever row limits a machine measures, each row count's path computes the same product."""
    kernels = cpu_kernel.fused_ops()
    weight = loaded.weights["model.layers.0.self_attn.o_proj.weight"]
    plan = LinearPlan(quant_rows=quant_rows, small_rows=2, packed_from=4, packed_to=192)
    layer = _o_proj(loaded)
    layer.prepare(kernels, plan)
    assert layer._quant_rows == quant_rows
    assert (layer._packed is None) == (quant_rows >= 192 or not onednn_available(torch.float32))
    for rows in (1, 2, 3, 7, 8, 9, 64, 65, 193, 600):
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
        got, want = layer(x), x.double() @ weight.double().t()
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6, rows
    # bf16: the block path is float32 math rounded once (from quant_linear_bf16_rows() rows on, on
    # the tile unit or the bf16 panel, of the bf16 weights); the other paths multiply the bf16 weights.
    layer = _o_proj(loaded).to(torch.bfloat16)
    layer.prepare(kernels, plan)
    bf16_from = kernels.quant_linear_bf16_rows()
    for rows in (1, 2, 5, 8, 9, 64, 600):
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        got = layer(x)
        if rows <= quant_rows and not (bf16_from and rows >= bf16_from):
            exact = x.double() @ weight.double().t()  # the GGUF weights, not their bf16 rounding
            assert got.dtype == torch.bfloat16
            assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all(), rows  # one rounding
        else:
            assert_bf16_product(got, x, weight.to(torch.bfloat16))


def test_a_model_frees_the_float_weights_that_no_path_reads(loaded):
    from quire.attention.torch_backend import TorchAttentionBackend
    from quire.models.registry import build_model

    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(loaded, TorchAttentionBackend(), dtype, 64, torch.device("cpu"))
        linears = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
        assert len(linears) == 4 * 30
        for layer in linears:
            served_by_blocks = layer._quant_rows == sys.maxsize
            assert (layer.weight.numel() == 0) == served_by_blocks
            assert layer.out_features == layer._quant_packed.shape[0] * 16 or not served_by_blocks
        assert model.lm_head.weight.numel() == 49152 * 576  # tied: the embedding table stays
        # Every row count still gives the product of the GGUF weights.
        layer, name = model.layers[0].mlp.down_proj, "model.layers.0.mlp.down_proj.weight"
        for rows in (1, 9, 300):
            x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(rows)).to(dtype)
            exact = x.double() @ loaded.weights[name].double().t()
            magnitude = x.double().abs() @ loaded.weights[name].double().abs().t()
            if dtype == torch.float32:
                tol = magnitude * 1e-5  # float32 sums of the exact weights
            else:  # one rounding of the result, and of the weights on the paths that use bf16 ones
                tol = (exact.abs() + magnitude) * 2**-8
            assert ((layer(x).double() - exact).abs() <= tol).all()
