"""The attention backend interface: write new K/V into their slots, attend through block tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """One step's flattened batch as attention sees it; built once per step by the model runner.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``; its K/V
    (``seq_lens[s]`` tokens including the new ones) are reached through ``block_tables[s]``.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: flat cache slot of each new token
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    max_query_len: int


class AttentionBackend(Protocol):
    # True when ``forward_qkv`` is available: rotation, cache write and attention in one call.
    fuses_qkv: bool

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 num_kv_heads) * head_dim], the fused projection
        rotary: tuple[torch.Tensor, torch.Tensor] | None,  # float32 (cos, sin) [num_tokens, head_dim / 2]
        num_heads: int,
        num_kv_heads: int,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        ...

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...
