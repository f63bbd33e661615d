"""Packed token masks: bit ``j`` of int32 word ``i`` allows token ``32 * i + j``.

The layout grammar engines fill (xgrammar's and llguidance's), so a grammar's mask and a request's
``allowed_token_ids`` combine with one AND, and the sampler applies one tensor to every masked row.
"""

from __future__ import annotations

import torch

_BITS = torch.arange(32, dtype=torch.int32)


def num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def all_allowed(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 with every bit set."""
    return torch.full((rows, num_words(vocab_size)), -1, dtype=torch.int32)


def pack(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """[words] int32 allowing exactly ``token_ids``."""
    allowed = torch.zeros(num_words(vocab_size) * 32, dtype=torch.bool)
    allowed[torch.tensor(token_ids, dtype=torch.long)] = True
    words = (allowed.view(-1, 32).to(torch.int64) << _BITS.to(torch.int64)).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
