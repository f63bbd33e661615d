"""The KV cache tensors: one allocation for all layers, carved into fixed-size blocks, plus a host pool.

Under tensor parallelism every rank holds the same blocks (same ids, same block tables) for its
own KV heads only, so the scheduler's block operations apply unchanged on every rank.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping

import torch

from quire.models.config import ArchConfig

# SchedulerOutput's block-operation lists, in the order they run before the forward, and the
# CacheEngine method that performs each; ``(src, dst)`` pairs in an int tensor [n, 2]. Swap-outs
# read blocks this step may hand to others, swap-ins fill blocks copy-on-write may then read.
BLOCK_OPS: dict[str, str] = {
    "blocks_to_swap_out": "swap_out",
    "blocks_to_swap_in": "swap_in",
    "blocks_to_copy": "copy_blocks",
}

Pairs = list[tuple[int, int]] | torch.Tensor

_MADV_HUGEPAGE = 14
_PAGE = 4096


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a host tensor with 2 MB pages where it can (transparent huge pages).

    Attention reads the pool one block (a few KB) at a time from anywhere in it: with 4 KB pages
    almost every block read also misses the TLB, with 2 MB pages a few hundred entries cover the
    pool. Only advice: with THP off (or another OS) nothing changes. The pages are still backed
    on first write, 2 MB at a time. Returns whether the kernel accepted the advice.
    """
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or tensor.nbytes < 2 * 2**20:
        return False
    start = tensor.data_ptr()
    aligned = -(-start // _PAGE) * _PAGE
    length = (start + tensor.nbytes - aligned) // _PAGE * _PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def kv_bytes_per_block(config: ArchConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    return config.num_layers * 2 * block_size * heads * config.head_dim * element


class CacheEngine:
    """Owns ``kv[layer, k_or_v, block, slot, kv_head, head_dim]`` on the device and ``host_kv`` in host memory.

    ``num_kv_heads`` is this rank's share. Both are allocated once, uninitialised (``torch.empty``);
    the device pool, on a CPU, asks for 2 MB pages (``advise_huge_pages``) and is written in full
    here (``back_pages``), or later by an owner that passes ``back_now=False`` to overlap it with
    other start-up work. The host pool, backed as swaps first write it, is where preempted groups
    are swapped to; on a GPU it is pinned so the copies can be DMA transfers. Every block
    operation is one gather and one scatter over all layers at once, whatever the block count.
    """

    def __init__(
        self,
        config: ArchConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_kv_heads: int | None = None,
        num_host_blocks: int = 0,
        back_now: bool = True,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        shape = (config.num_layers, 2, num_blocks, block_size, heads, config.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        advise_huge_pages(self.kv)
        # Per layer (key, value) views, made once: unbinding them every layer of every step costs more
        # than the attention of a one-token decode.
        self.layers = [tuple(layer.unbind(0)) for layer in self.kv.unbind(0)]
        host_shape = (*shape[:2], num_host_blocks, *shape[3:])
        self.host_kv = torch.empty(host_shape, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")
        if back_now:
            self.back_pages()

    def back_pages(self) -> None:
        """Write the whole device pool once, so that the OS backs its pages now and not in the steps
        that first write each block.

        On the 2-core VMs measured here a first-written 2 MB page costs 1-3 ms (the hypervisor backs
        it and the kernel finds a free huge page), while a step writes a few hundred KB per layer:
        left lazy, the 64-request benchmark paid ~2 s of system time for its ~1.8 GB of first-written
        blocks and ran 3-4 s slower (docs/benchmarks.md). The pool is the KV budget asked for, so it
        is committed up front, as a GPU engine's is. No block is read before it is written anyway.
        """
        self.kv.zero_()

    def apply_block_ops(self, ops: Mapping[str, Pairs]) -> None:
        """Run a step's block operations (``BLOCK_OPS`` names → [n, 2] pairs) in ``BLOCK_OPS`` order."""
        unknown = set(ops) - set(BLOCK_OPS)
        if unknown:
            raise NotImplementedError(f"block operations without a CacheEngine method: {sorted(unknown)}")
        for name, method in BLOCK_OPS.items():
            pairs = ops.get(name)
            if pairs is not None and len(pairs):
                getattr(self, method)(pairs)

    def swap_out(self, pairs: Pairs) -> None:
        """Copy (device block, host block) pairs to the host pool."""
        _copy_blocks(self.kv, self.host_kv, pairs)

    def swap_in(self, pairs: Pairs) -> None:
        """Copy (host block, device block) pairs back to the device."""
        _copy_blocks(self.host_kv, self.kv, pairs)

    def copy_blocks(self, pairs: Pairs) -> None:
        """Copy-on-write: duplicate each source block into its destination, in every layer."""
        _copy_blocks(self.kv, self.kv, pairs)


def _copy_blocks(src_kv: torch.Tensor, dst_kv: torch.Tensor, pairs: Pairs) -> None:
    """``dst_kv[:, :, d] = src_kv[:, :, s]`` for every (s, d) pair: one gather and one scatter for all layers."""
    if len(pairs) == 0:
        return
    pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
    src, dst = pairs[:, 0].to(src_kv.device), pairs[:, 1].to(dst_kv.device)
    # [layer * k_or_v, block, everything in a block]: each block is one contiguous run per (layer, k_or_v).
    src_view = src_kv.view(src_kv.shape[0] * 2, src_kv.shape[2], -1)
    dst_view = dst_kv.view(dst_kv.shape[0] * 2, dst_kv.shape[2], -1)
    moved = src_view.index_select(1, src).to(dst_kv.device, non_blocking=True)
    dst_view.index_copy_(1, dst, moved)
