"""The CPU attention backend: a compiled paged kernel when it builds, pure PyTorch otherwise."""

from __future__ import annotations

import torch

from quire.attention import cpu_kernel
from quire.attention.backend import AttentionMetadata
from quire.attention.reference import paged_attention_reference


class TorchAttentionBackend:
    """Writes each new token's K/V into its cache slot, then attends through the block tables."""

    def __init__(self, use_kernel: bool = True) -> None:
        self.use_kernel = use_kernel and cpu_kernel.is_available()
        self._attend = cpu_kernel.paged_attention if self.use_kernel else paged_attention_reference
        self._kernels = cpu_kernel.fused_ops() if self.use_kernel else None

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
        return self._attend(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            scale,
        )
