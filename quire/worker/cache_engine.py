"""The KV cache tensors: one allocation for all layers, carved into fixed-size blocks, plus a host pool."""

from __future__ import annotations

import torch

from quire.models.config import LlamaArchConfig


def kv_bytes_per_block(config: LlamaArchConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * element


class CacheEngine:
    """Owns ``kv[layer, k_or_v, block, slot, kv_head, head_dim]`` on the device and ``host_kv`` in host memory.

    Both are allocated once, uninitialised (``torch.empty``): the OS backs pages only when blocks
    are first written, and no block is read before it is written. The host pool is where
    preempted groups are swapped to; on a GPU it is pinned so the copies can be DMA transfers.
    Every block operation is one indexed copy over all layers at once, whatever the block count.
    """

    def __init__(
        self,
        config: LlamaArchConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_host_blocks: int = 0,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        self.layers = list(self.kv.unbind(0))
        host_shape = (*shape[:2], num_host_blocks, *shape[3:])
        self.host_kv = torch.empty(host_shape, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")

    def apply(
        self,
        swap_out: list[tuple[int, int]],
        swap_in: list[tuple[int, int]],
        copy: list[tuple[int, int]],
    ) -> None:
        """A step's block operations, in the order the scheduler's decisions require (see SchedulerOutput)."""
        self.swap_out(swap_out)
        self.swap_in(swap_in)
        self.copy_blocks(copy)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device block, host block) pairs to the host pool."""
        _copy_blocks(self.kv, self.host_kv, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (host block, device block) pairs back to the device."""
        _copy_blocks(self.host_kv, self.kv, pairs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate each source block into its destination, in every layer."""
        _copy_blocks(self.kv, self.kv, pairs)


def _copy_blocks(src_kv: torch.Tensor, dst_kv: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """``dst_kv[:, :, d] = src_kv[:, :, s]`` for every (s, d) pair: one gather and one scatter for all layers."""
    if not pairs:
        return
    src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=src_kv.device)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dst_kv.device)
    # [layer * k_or_v, block, everything in a block]: each block is one contiguous run per (layer, k_or_v).
    src_view = src_kv.view(src_kv.shape[0] * 2, src_kv.shape[2], -1)
    dst_view = dst_kv.view(dst_kv.shape[0] * 2, dst_kv.shape[2], -1)
    moved = src_view.index_select(1, src).to(dst_kv.device, non_blocking=True)
    dst_view.index_copy_(1, dst, moved)
