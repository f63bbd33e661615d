"""Megatron-style tensor-parallel layers: each rank holds a slice of the weight and loads only it.

* ``ColumnParallelLinear``: output rows split; a fused weight (q|k|v, gate|up) is several parts,
  each sliced on its own, so a rank's q, k and v rows are for the same heads. No communication.
* ``RowParallelLinear``: input columns split; partial products are summed with one all-reduce,
  then the bias (held whole) is added once.
* ``VocabParallelEmbedding`` / ``ParallelLMHead``: vocabulary rows split; the embedding zeroes the
  ids outside its slice and all-reduces, the LM head gathers its logit columns on the driver.

With one rank every slice is the whole weight and no collective runs, so the single-process
model is the same code at the same speed. Each layer's ``load`` takes the checkpoint's full tensor
and ``load_quantized`` its GGUF block copy (rows are whole blocks; columns only at block edges).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quire.distributed.comm import TPGroup
from quire.distributed.partition import split_range
from quire.models.block_format import BLOCK_BYTES, QK
from quire.models.linear import Linear
from quire.models.loader import BlockQuantized


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"weight {name}: expected shape {shape}, got {tuple(tensor.shape)}")


class ColumnParallelLinear(Linear):
    """``parts`` maps each part's name to (its full row count, the rows of it this rank holds)."""

    def __init__(self, in_features: int, parts: dict[str, tuple[int, range]], bias: bool = False) -> None:
        super().__init__(in_features, sum(len(rows) for _, rows in parts.values()), bias)
        self.parts = parts
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, (_, rows) in parts.items():
            self._offsets[name] = offset
            offset += len(rows)
        self._quant_parts: dict[str, BlockQuantized] = {}

    @classmethod
    def single(cls, in_features: int, out_features: int, group: TPGroup, bias: bool = False) -> ColumnParallelLinear:
        return cls(in_features, {"": (out_features, split_range(out_features, group.size, group.rank))}, bias)

    def load(self, param: str, tensor: torch.Tensor, part: str = "") -> None:
        full, rows = self.parts[part]
        _check_shape(f"{param}[{part}]", tensor, (full, *getattr(self, param).shape[1:]))
        offset = self._offsets[part]
        with torch.no_grad():
            getattr(self, param)[offset : offset + len(rows)].copy_(tensor[rows.start : rows.stop])

    def load_quantized(self, quantized: BlockQuantized, part: str = "") -> None:
        rows = self.parts[part][1]
        self._quant_parts[part] = BlockQuantized(quantized.kind, quantized.blocks[rows.start : rows.stop])
        found = [self._quant_parts.get(name) for name in self.parts]
        if all(q is not None for q in found) and len({q.kind for q in found}) == 1:
            self.quantized = BlockQuantized(found[0].kind, torch.cat([q.blocks for q in found]).contiguous())


class RowParallelLinear(Linear):
    """Holds input columns ``cols`` of an [out_features, in_features] weight; sums partial outputs."""

    def __init__(self, in_features: int, out_features: int, cols: range, group: TPGroup, bias: bool = False) -> None:
        super().__init__(len(cols), out_features, bias)
        self.full_in, self.cols, self.group = in_features, cols, group

    def load(self, param: str, tensor: torch.Tensor, part: str = "") -> None:
        target = getattr(self, param)
        if param == "weight":
            _check_shape(param, tensor, (target.shape[0], self.full_in))
            tensor = tensor[:, self.cols.start : self.cols.stop]
        _check_shape(param, tensor, tuple(target.shape))
        with torch.no_grad():
            target.copy_(tensor)

    def load_quantized(self, quantized: BlockQuantized, part: str = "") -> None:
        if self.cols.start % QK or self.cols.stop % QK:
            return  # a slice inside a block: the float path serves all row counts
        step = BLOCK_BYTES[quantized.kind]
        blocks = quantized.blocks[:, self.cols.start // QK * step : self.cols.stop // QK * step]
        self.quantized = BlockQuantized(quantized.kind, blocks.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(self.matmul(x))
        return out if self.bias is None else out.add_(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Rows ``vocab_rows`` of the token embedding; ids outside them contribute zeros before the all-reduce."""

    def __init__(self, vocab_size: int, dim: int, group: TPGroup) -> None:
        super().__init__()
        self.vocab_size, self.group = vocab_size, group
        self.rows = split_range(vocab_size, group.size, group.rank)
        self.weight = nn.Parameter(torch.empty(len(self.rows), dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.rows.start
        outside = (local < 0) | (local >= len(self.rows))
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(1), 0.0)
        return self.group.all_reduce(out)

    def load(self, param: str, tensor: torch.Tensor, part: str = "") -> None:
        _check_shape(param, tensor, (self.vocab_size, self.weight.shape[1]))
        with torch.no_grad():
            self.weight.copy_(tensor[self.rows.start : self.rows.stop])


class ParallelLMHead(ColumnParallelLinear):
    """Logits for this rank's vocabulary rows; ``compute_logits`` assembles all of them on the driver."""

    def __init__(self, dim: int, vocab_size: int, group: TPGroup, tied_to: VocabParallelEmbedding | None) -> None:
        super().__init__(dim, {"": (vocab_size, split_range(vocab_size, group.size, group.rank))})
        self.group = group
        self.widths = [len(split_range(vocab_size, group.size, r)) for r in range(group.size)]
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight  # one tensor, listed once by named_parameters

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 [rows, vocab] on the driver, None on the other ranks (which only contribute)."""
        logits = self.group.gather_columns(self(hidden), self.widths)
        return None if logits is None else logits.float()
