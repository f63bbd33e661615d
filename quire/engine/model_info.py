"""What a benchmark or tool may know about the engine's model without holding the model itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quire.models.config import ArchConfig

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model's architecture and how this rank runs it.

    ``arch`` sizes KV tensors (``quire.worker.cache_engine``) the way the engine does;
    ``num_local_kv_heads`` is this rank's share of the KV heads under tensor parallelism;
    ``attention_kernel`` tells whether the compiled paged-attention kernel is in use (else the
    pure-PyTorch reference).
    """

    arch: ArchConfig
    dtype: torch.dtype
    num_local_kv_heads: int
    attention_kernel: bool
