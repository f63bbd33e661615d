"""The GGUF block formats the compiled linears multiply from (Q4_1, Q8_0) and their packed layout."""

from __future__ import annotations

import torch

QK = 32  # weights per GGUF block
QUANT_KINDS = {"q4_1": 0, "q8_0": 1}  # the kind codes ``quant_linear`` takes
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # bytes per block of QK weights


def pack_quantized(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """GGUF rows of blocks [N, K/32 * block bytes] -> ``quant_linear``'s layout [ceil(N/16), K/32, 16 * block bytes].

    Rows go in groups of 16 side by side, so one vector lane of the kernel is one output row
    (the layout is described in ``fused_ops.cpp``). Padding rows are zero (d = m = 0).
    """
    block_bytes = BLOCK_BYTES[kind]
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
