"""A linear layer that picks the fastest CPU path for the number of rows it gets.

A step's batch ranges from one decode row to a few hundred prefill rows, and no single product
is fast across that range. The paths, and up to how many rows each serves, measured on the
machine that runs (``models/calibration.py``; docs/benchmarks.md has figures per CPU):

* a GGUF model's layers keep their weights in the block format too (Q4_1: 5 bits a weight, Q8_0:
  8.5) and ``quant_linear`` multiplies from it, 16 output rows side by side, one vector lane each:
  few rows multiply the block's integers in registers, scaling by d (and adding m) once per block;
  more rows expand 32 output rows' weights once per K chunk into an L1-resident float32 panel
  (the exact gguf values) and run a register-blocked product over it. The weights are the float32
  copy's values; the sums differ from the float product only by rounding order. bf16 activations
  are widened and the float32 result rounded once; from ``quant_linear_bf16_rows()`` rows on (0:
  never) a bf16 layer multiplies the bf16 weights instead, the blocks expanded to them once per
  call: on the AMX tile unit, or with VDPBF16PS from an L1 panel of bf16 pairs on AVX512-BF16;
* a few rows of a float layer: ``small_linear`` streams the weight once at memory speed;
* oneDNN with the weight reordered once into its blocked layout (AMX tiles in bf16) instead of
  repacked on every call;
* otherwise PyTorch's ``F.linear``.

A layer whose block path serves every row count frees its float weight. All paths accumulate in
float32 and round once to the layer dtype; each computes a row the same way whatever the other
rows are, so only the row count (not the batch's contents) picks the path.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from quire.models.block_format import QUANT_KINDS, pack_quantized
from quire.models.calibration import LinearPlan, linear_plan, onednn_available


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

    def prepare(self, kernels, plan: LinearPlan | None = None) -> None:
        """Call once the weight holds its final values and dtype: sets up the fast paths.

        Args:
            kernels: the compiled op namespace (``cpu_kernel.fused_ops()``) or None.
            plan: the row limits of each path for the weight's dtype; by default this machine's
                (``calibration.linear_plan``, measured once and cached on disk).
        """
        weight = self.weight.detach()
        self._kernels = kernels if weight.is_cpu else None
        if self._kernels is None:
            self.quantized = None  # only the CPU kernels read the block format; elsewhere the float weight serves
        if self.quantized is not None:  # packed once; the GGUF-layout copy is not needed after that
            self._quant_packed = pack_quantized(self.quantized.blocks, self.quantized.kind)
            self._quant_kind = QUANT_KINDS[self.quantized.kind]
            self.quantized = None
        plan = plan or linear_plan(self._kernels, weight.dtype)
        self._small_rows = plan.small_rows if self._kernels is not None else 0
        self._quant_rows = plan.quant_rows if self._kernels is not None and self._quant_packed is not None else 0
        self._packed = None
        self._packed_rows = plan.packed_range()
        if self._packed_rows and self._packed_rows.stop - 1 <= self._quant_rows:
            self._packed_rows = range(0)  # the block path serves every row count the packed copy would
        if self._packed_rows and weight.is_cpu and onednn_available(weight.dtype):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def release_weight(self) -> bool:
        """After ``prepare``: free the float weight if the block path serves every row count.

        That path never reads it: a GGUF model whose block path wins at every row count (float32
        without AMX; bf16 with AMX or AVX512-BF16) would otherwise hold every linear weight twice
        (0.42 GB in float32, 0.21 GB in bf16 for the default model). The layer cannot be prepared
        again afterwards. Returns whether the weight was freed.
        """
        if self._quant_rows != sys.maxsize or self.weight.numel() == 0:
            return False
        self.weight = nn.Parameter(self.weight.detach().new_empty(0, self.weight.shape[1]), requires_grad=False)
        return True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def weight_bytes_read(self, rows: int) -> int:
        """The bytes of weights a product of ``rows`` rows reads: the block format where that path
        serves the row count, else the float weight (what bounds a decode step's speed)."""
        if rows <= self._quant_rows:
            return self._quant_packed.numel()
        return self.out_features * self.in_features * self.weight.element_size()

    @property
    def block_rows(self) -> int:
        """Up to how many rows the block-format path serves (0: none)."""
        return self._quant_rows

    def block_weight(self) -> tuple[torch.Tensor, int]:
        """The packed block-format weight and its kind, as ``quant_linear`` takes them: for a
        compiled layer stack that makes the same call ``matmul`` makes up to ``block_rows`` rows."""
        if not self._quant_rows:
            raise ValueError("this layer has no block-format path")
        return self._quant_packed, self._quant_kind

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
