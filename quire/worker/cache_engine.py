"""The KV cache tensors: one allocation for all layers, carved into fixed-size blocks."""

from __future__ import annotations

import torch

from quire.models.config import LlamaArchConfig


def kv_bytes_per_block(config: LlamaArchConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * element


class CacheEngine:
    """Owns ``kv[layer, k_or_v, block, slot, kv_head, head_dim]``.

    Allocated once, uninitialised (``torch.empty``): the OS backs pages only when blocks are
    first written, and no block is read before it is written.
    """

    def __init__(
        self, config: LlamaArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv = torch.empty(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim),
            dtype=dtype,
            device=device,
        )
        self.layers = list(self.kv.unbind(0))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate each source block into its destination, in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.kv.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]
