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
from quire.worker.platform import Platform

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
    """Owns ``kv[layer, k_or_v, block, slot, kv_head, head_dim]`` on the device and the host pool
    ``host_kv[block, layer, k_or_v, slot, kv_head, head_dim]``.

    ``num_kv_heads`` is this rank's share. Both are allocated once, uninitialised (``torch.empty``);
    the device pool, on a CPU, asks for 2 MB pages (``advise_huge_pages``) and is written in full
    here (``back_pages``), or later by an owner that passes ``back_now=False`` to overlap it with
    other start-up work. The host pool, backed as swaps first write it, is where preempted groups
    are swapped to. It is block-major, so each host block is one contiguous run that a single copy
    fills or reads; on a GPU it is pinned, and swaps run on a side stream (``Platform``): a swap-out's
    transfer overlaps the forward, and the forward waits only for the blocks a swap-in brings back.
    Copy-on-write is one gather and one scatter over all layers at once, whatever the block count.
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
        self.platform = Platform(torch.device(device))
        heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        shape = (config.num_layers, 2, num_blocks, block_size, heads, config.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        advise_huge_pages(self.kv)
        # Per layer (key, value) views, made once: unbinding them every layer of every step costs more
        # than the attention of a one-token decode.
        self.layers = [tuple(layer.unbind(0)) for layer in self.kv.unbind(0)]
        self.host_kv = self.platform.host_empty((num_host_blocks, *shape[:2], *shape[3:]), dtype)
        self._copy_stream = self.platform.new_stream()
        # Swap-outs still in flight: (event, the gathered device blocks the copies read from).
        self._in_flight: list[tuple[object, torch.Tensor]] = []
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
        self._retire_finished()
        for name, method in BLOCK_OPS.items():
            pairs = ops.get(name)
            if pairs is not None and len(pairs):
                getattr(self, method)(pairs)

    def swap_out(self, pairs: Pairs) -> None:
        """Copy (device block, host block) pairs to the host pool.

        The blocks are gathered in the forward's stream (so a later forward may reuse them at once),
        then copied to the host on the side stream, one contiguous copy per block.
        """
        src, dst = _split(pairs)
        moved = self._gather(src.to(self.kv.device))
        compute = self.platform.current_stream()
        self.platform.wait_stream(self._copy_stream, compute)
        with self.platform.use_stream(self._copy_stream):
            for i, block in enumerate(dst.tolist()):
                self.host_kv[block].copy_(moved[i], non_blocking=True)
        self._in_flight.append((self.platform.record_event(self._copy_stream), moved))

    def swap_in(self, pairs: Pairs) -> None:
        """Copy (host block, device block) pairs back to the device; the forward waits for them."""
        src, dst = _split(pairs)
        compute = self.platform.current_stream()
        # The destination blocks may still be read by work the forward's stream has queued.
        self.platform.wait_stream(self._copy_stream, compute)
        with self.platform.use_stream(self._copy_stream):
            staged = torch.empty((len(src), *self.host_kv.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
            for i, block in enumerate(src.tolist()):
                staged[i].copy_(self.host_kv[block], non_blocking=True)
            self._scatter(dst.to(self.kv.device), staged)
            done = self.platform.record_event(self._copy_stream)
        done.wait(compute)
        self._in_flight.append((done, staged))

    def copy_blocks(self, pairs: Pairs) -> None:
        """Copy-on-write: duplicate each source block into its destination, in every layer."""
        src, dst = _split(pairs)
        src, dst = src.to(self.kv.device), dst.to(self.kv.device)
        flat = self.kv.view(self.kv.shape[0] * 2, self.kv.shape[2], -1)  # [layer * k_or_v, block, block data]
        flat.index_copy_(1, dst, flat.index_select(1, src))

    def wait_for_copies(self) -> None:
        """Block until every swap queued so far has landed (for timing them, or before reading ``host_kv``)."""
        for event, _ in self._in_flight:
            event.synchronize()
        self._in_flight.clear()

    def _retire_finished(self) -> None:
        """Drop the buffers of swaps that have landed (their memory may then be reused)."""
        self._in_flight = [(event, buf) for event, buf in self._in_flight if not event.query()]

    def _gather(self, blocks: torch.Tensor) -> torch.Tensor:
        """The given device blocks as ``[n, layer, k_or_v, slot, kv_head, head_dim]``, contiguous."""
        return self._block_major().index_select(0, blocks)

    def _scatter(self, blocks: torch.Tensor, data: torch.Tensor) -> None:
        """``_gather``'s inverse: write ``data[i]`` into device block ``blocks[i]``."""
        self._block_major().index_copy_(0, blocks, data)

    def _block_major(self) -> torch.Tensor:
        """A view of the device pool indexed by block first, the host pool's order."""
        return self.kv.permute(2, 0, 1, 3, 4, 5)


def _split(pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
    return pairs[:, 0], pairs[:, 1]
