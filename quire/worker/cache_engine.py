"""The KV cache tensors: one allocation for all layers, carved into fixed-size blocks.

Under tensor parallelism every rank holds the same blocks (same ids, same block tables) for its
own KV heads only, so the scheduler's block operations apply unchanged on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quire.models.config import ArchConfig

# SchedulerOutput's block-operation lists, in the order they run before the forward, and the
# CacheEngine method that performs each; ``(src, dst)`` pairs in an int tensor [n, 2].
BLOCK_OPS: dict[str, str] = {
    "blocks_to_copy": "copy_blocks",
}


def kv_bytes_per_block(config: ArchConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    return config.num_layers * 2 * block_size * heads * config.head_dim * element


class CacheEngine:
    """Owns ``kv[layer, k_or_v, block, slot, kv_head, head_dim]`` (``num_kv_heads``: this rank's share).

    Allocated once, uninitialised (``torch.empty``): the OS backs pages only when blocks are
    first written, and no block is read before it is written.
    """

    def __init__(
        self,
        config: ArchConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_kv_heads: int | None = None,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        self.kv = torch.empty(
            (config.num_layers, 2, num_blocks, block_size, heads, config.head_dim),
            dtype=dtype,
            device=device,
        )
        self.layers = list(self.kv.unbind(0))

    def apply_block_ops(self, ops: Mapping[str, torch.Tensor]) -> None:
        """Run a step's block operations (``BLOCK_OPS`` names → [n, 2] pairs) in ``BLOCK_OPS`` order."""
        unknown = set(ops) - set(BLOCK_OPS)
        if unknown:
            raise NotImplementedError(f"block operations without a CacheEngine method: {sorted(unknown)}")
        for name, method in BLOCK_OPS.items():
            pairs = ops.get(name)
            if pairs is not None and len(pairs):
                getattr(self, method)(pairs)

    def copy_blocks(self, pairs: list[tuple[int, int]] | torch.Tensor) -> None:
        """Copy-on-write: duplicate each source block into its destination, in every layer."""
        if len(pairs) == 0:
            return
        pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2).to(self.kv.device)
        self.kv[:, :, pairs[:, 1]] = self.kv[:, :, pairs[:, 0]]
