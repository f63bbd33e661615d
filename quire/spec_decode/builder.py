"""The proposer a ``SpeculativeConfig`` asks for (None without speculative decoding)."""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionBackend
from quire.config import SpeculativeConfig
from quire.spec_decode.proposer import Proposer


def build_proposer(
    config: SpeculativeConfig | None,
    attention: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    vocab_size: int,
    num_blocks: int,
    block_size: int,
    num_host_blocks: int,
) -> Proposer | None:
    """Prompt lookup needs only the config; a draft model gets a KV cache of the target's block counts."""
    if config is None:
        return None
    if config.method == "ngram":
        from quire.spec_decode.ngram import NgramProposer

        return NgramProposer(config)
    from quire.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(
        config, attention, dtype, device, max_model_len, vocab_size, num_blocks, block_size, num_host_blocks
    )
