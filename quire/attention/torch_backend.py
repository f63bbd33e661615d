"""The CPU attention backend: a compiled paged kernel when it builds, pure PyTorch otherwise."""

from __future__ import annotations

import logging

import torch

from quire.attention.backend import AttentionMetadata
from quire.attention.reference import paged_attention_reference
from quire.attention.split_calibration import split_min_kv
from quire.kernels import cpu_kernel

logger = logging.getLogger(__name__)


class TorchAttentionBackend:
    """Writes each new token's K/V into its cache slot, then attends through the block tables."""

    def __init__(self, use_kernel: bool = True) -> None:
        self.use_kernel = use_kernel and cpu_kernel.is_available()
        self._kernels = cpu_kernel.fused_ops() if self.use_kernel else None
        self._splits: dict[tuple, int] = {}  # (q heads, kv heads, head_dim, dtype) -> split_min_kv

    def split_min_kv(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """The kernel's split-KV range length for this head shape, calibrated once on first use
        (``split_calibration.py``); the compiled layer stack asks for it too."""
        shape = (num_heads, num_kv_heads, head_dim, dtype)
        if shape not in self._splits:
            self._splits[shape] = split = split_min_kv(self._kernels, *shape)
            if self._kernels is not None:
                logger.info("decode attention, %d/%d heads x %d %s: split-KV ranges of >= %s positions",
                            num_heads, num_kv_heads, head_dim, dtype, split or "inf (never split)")
        return self._splits[shape]

    @property
    def fuses_qkv(self) -> bool:
        """True when ``forward_qkv`` runs as one compiled call (the CPU extension built)."""
        return self._kernels is not None

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        num_heads: int,
        num_kv_heads: int,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Rotation (half-split, float32 ``(cos, sin)`` [T, head_dim / 2]), cache write and attention
        for the rows of a fused q|k|v projection in one compiled call; returns [T, num_heads * head_dim].

        Saves a layer the ~10 Python-level tensor ops of the unfused path (about 3 ms a decode step
        for the default model's 30 layers).
        """
        cos, sin = rotary if rotary is not None else (None, None)
        return self._kernels.attend_qkv(
            qkv,
            cos,
            sin,
            key_cache,
            value_cache,
            metadata.slot_mapping,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            num_heads,
            num_kv_heads,
            scale,
            self.split_min_kv(num_heads, num_kv_heads, key_cache.shape[3], qkv.dtype),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        key_slots = key_cache.view(-1, num_kv_heads, head_dim)
        value_slots = value_cache.view(-1, num_kv_heads, head_dim)
        if self._kernels is not None and key.is_cpu:
            self._kernels.write_kv(key, value, key_slots, value_slots, metadata.slot_mapping)
        else:
            key_slots.index_copy_(0, metadata.slot_mapping, key)
            value_slots.index_copy_(0, metadata.slot_mapping, value)
        args = (query, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens)
        if not self.use_kernel:
            return paged_attention_reference(*args, scale)
        split = self.split_min_kv(query.shape[1], num_kv_heads, head_dim, query.dtype)
        return cpu_kernel.paged_attention(*args, scale, split_min_kv=split)
