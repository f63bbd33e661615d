"""A linear layer that picks the fastest CPU path for the number of rows it gets.

A step's batch ranges from one decode row to a few hundred prefill rows, and no single GEMM call
is fast across that range on this CPU (see docs/benchmarks.md):

* a GGUF model, in float32 up to 112 rows with AMX, at every row count without (in bf16 up to 4
  rows with AMX, 8 without; ``QUANT_ROWS``): ``quant_linear``
  reads the weight in its block format (Q4_1: 5 bits a weight instead of 32 or 16), 16 output
  rows side by side, one vector lane each, requesting blocks ahead of use so that DRAM reads
  overlap the arithmetic.
  Up to 8 rows it multiplies the block's integers in registers, scaling by d (and adding m) once
  per block; from 9 rows it expands 32 output rows' weights once per K chunk into an L1-resident
  float32 panel (the exact gguf values) and runs a register-blocked product over it for all
  rows. Either way the weights are the same values as the float32 copy and the sums differ from
  the float product only by rounding order. All 121 linears of the default model, weights from
  DRAM, 2 threads, against oneDNN on the float32 weights: 0.25-0.28x the time at 1 row, 0.35-0.5x
  at 8, 0.6-0.7x at 24, 0.65-0.85x at 64, about even at ~128 rows. Against oneDNN's bf16 (AMX) product
  on bf16 weights it takes 0.67x the time at 4-6 rows, 0.8x at 8 and 1.2x at 12. bf16
  activations are widened, and the float32 result rounded once;
* a GGUF model in bf16 on a CPU with AMX, from 5 rows at any count: ``quant_linear`` expands the
  blocks to the bf16 weights (the gguf values rounded as ``.to(torch.bfloat16)`` rounds them)
  straight into the tile unit's operand layout, once per call, and multiplies on the tile unit.
  oneDNN on the stored bf16 weights moves them at about half the DRAM bandwidth, so from 8 to 64
  rows it takes about the same time; from the blocks, all 121 linears take 0.6-1.0x its time
  (9-512 rows, weights from DRAM; 0.7x the register-tile path's at 8 rows, 0.86x at 6), and the
  model needs no reordered bf16 copy;
* one to three rows: the product is bound by reading the weight once, which the C++
  ``small_linear`` kernel streams at memory speed (PyTorch's bf16 path at M=1 is ~3x slower);
* from 4 rows: oneDNN with the weight reordered once into its blocked layout (AMX tiles in bf16),
  instead of MKL/oneDNN repacking it on every call: 1.2-1.6x faster in fp32 up to ~128 rows,
  1.2-1.7x in bf16 up to 512 rows;
* otherwise PyTorch's ``F.linear``.

The packed copy doubles the weights' memory (0.5 GB more for the default model in fp32). All
paths accumulate in float32 and round once to the layer dtype; each path computes a row the same
way whatever the other rows are, so only the row count (not the batch's contents) picks the path.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

# Row counts for which each path measured fastest here (1 and 2 threads, docs/benchmarks.md).
SMALL_ROWS = {torch.float32: 2, torch.bfloat16: 3}
PACKED_ROWS = {torch.float32: range(4, 193), torch.bfloat16: range(4, 513)}
# Up to how many rows a GGUF layer takes the block path (``quant_linear``), by whether the CPU has
# AMX tile units. Measured on a Sapphire Rapids-class Xeon (AMX; 2 x 512-bit FMA per core, where
# oneDNN's float32 GEMM pulls ahead from ~113 rows) and on a Zen 4 EPYC (no AMX; the block path
# matches oneDNN's float32 speed at every row count and beats MKL's by 1.1-1.2x at 512 rows, while
# in bf16 oneDNN's AVX512-BF16 product wins from ~9 rows).
QUANT_ROWS = {torch.float32: sys.maxsize, torch.bfloat16: 8}
QUANT_ROWS_AMX = {torch.float32: 112, torch.bfloat16: sys.maxsize}
_QUANT_KINDS = {"q4_1": 0, "q8_0": 1}
_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


def pack_quantized(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """GGUF rows of blocks [N, K/32 * block bytes] -> ``quant_linear``'s layout [ceil(N/16), K/32, 16 * block bytes].

    Rows go in groups of 16 side by side, so one vector lane of the kernel is one output row
    (the layout is described in ``fused_ops.cpp``). Padding rows are zero (d = m = 0).
    """
    block_bytes = _BLOCK_BYTES[kind]
    n = blocks.shape[0]
    groups = -(-n // 16)
    rows = torch.zeros(groups * 16, blocks.shape[1], dtype=torch.uint8)
    rows[:n] = blocks
    t = rows.view(groups, 16, -1, block_bytes).permute(0, 2, 1, 3)  # [group, block, row, byte]
    scales = 4 if kind == "q4_1" else 2  # fp16 d (and m) lead each block
    parts = [t[..., 0:2], t[..., 2:4]] if kind == "q4_1" else [t[..., 0:2]]
    quants = t[..., scales:].transpose(2, 3)  # [group, block, byte, row]
    flat = [p.reshape(groups, t.shape[1], -1) for p in (*parts, quants)]
    return torch.cat(flat, dim=2).contiguous()


def _onednn_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with ``weight`` [out_features, in_features] (nn.Linear's layout and names).

    The bias, when there is one, is added after whichever product path ran.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernels = None
        self._small_rows = 0
        self._packed: torch.Tensor | None = None
        self._packed_rows = range(0)
        self.quantized = None  # a loader.BlockQuantized copy of the weight, set by the model's loader
        self._quant_rows = 0
        self._quant_packed: torch.Tensor | None = None
        self._quant_kind = -1

    def prepare(self, kernels) -> None:
        """Call once the weight holds its final values and dtype: sets up the fast paths.

        ``kernels`` is the compiled op namespace (``cpu_kernel.fused_ops()``) or None.
        """
        weight = self.weight.detach()
        self._kernels = kernels
        self._small_rows = SMALL_ROWS.get(weight.dtype, 0) if kernels is not None and weight.is_cpu else 0
        usable = kernels is not None and weight.is_cpu
        if self.quantized is not None:  # packed once; the GGUF-layout copy is not needed after that
            self._quant_packed = pack_quantized(self.quantized.blocks, self.quantized.kind)
            self._quant_kind = _QUANT_KINDS[self.quantized.kind]
            self.quantized = None
        self._quant_rows = 0
        if usable and self._quant_packed is not None:
            limits = QUANT_ROWS_AMX if kernels.quant_linear_uses_amx() else QUANT_ROWS
            self._quant_rows = limits.get(weight.dtype, 0)
        self._packed = None
        self._packed_rows = PACKED_ROWS.get(weight.dtype, range(0))
        if self._packed_rows and self._packed_rows.stop - 1 <= self._quant_rows:
            self._packed_rows = range(0)  # the block path serves every row count the packed copy would
        if self._packed_rows and weight.is_cpu and _onednn_available(weight.dtype):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def release_weight(self) -> bool:
        """After ``prepare``: free the float weight if the block path serves every row count.

        That path never reads it: a float32 GGUF model on a CPU without AMX, or a bf16 one with
        AMX, would otherwise hold every linear weight twice (0.42 GB in float32, 0.21 GB in bf16
        for the default model). The layer cannot be prepared again afterwards. Returns whether
        the weight was freed.
        """
        if self._quant_rows != sys.maxsize or self.weight.numel() == 0:
            return False
        self.weight = nn.Parameter(self.weight.detach().new_empty(0, self.weight.shape[1]), requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out.add_(self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` without the bias."""
        rows = x.shape[0]
        if rows <= self._quant_rows:  # float32 math; a bf16 layer rounds the result once
            return self._kernels.quant_linear(x, self._quant_packed, self._quant_kind, self.out_features)
        if rows <= self._small_rows:
            out = x.new_empty(rows, self.out_features)
            self._kernels.small_linear(x.contiguous(), self.weight, out)
            return out
        if self._packed is not None and rows in self._packed_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return F.linear(x, self.weight)
