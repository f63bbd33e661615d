"""Pure-PyTorch paged attention: the correctness reference for the CPU kernel.

For each sequence the K/V rows are gathered through its block table and fed to
``torch.nn.functional.scaled_dot_product_attention`` with a causal mask that is
offset by the sequence's cached context.  Everything is computed in float32
and the result is cast to the query dtype.  Correct, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["paged_attention_reference"]


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`quire.kernels.cpu_kernel.paged_attention`.

    Query row ``i`` of sequence ``s`` (``query_len = qs[s+1] - qs[s]``) is at
    position ``p = seq_lens[s] - query_len + i`` and attends to KV positions
    ``0..p``; KV position ``j`` lives at
    ``key_cache[block_tables[s, j // block_size], j % block_size]``.
    """
    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError("query must be 3-D and key_cache 4-D")
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_dim = key_cache.shape
    if kv_dim != head_dim or value_cache.shape != key_cache.shape:
        raise ValueError("cache shapes do not match the query")
    if num_q_heads % num_kv_heads:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")
    group = num_q_heads // num_kv_heads

    if out is None:
        out = torch.zeros_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_begin, q_end = qsl[s], qsl[s + 1]
        query_len = q_end - q_begin
        if query_len == 0:
            continue
        if seq_len < query_len:
            raise ValueError(f"seq_lens[{s}]={seq_len} < query length {query_len}")
        num_blocks = (seq_len + block_size - 1) // block_size
        ids = block_tables[s, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim] -> [num_q_heads, seq_len, head_dim]
        k = key_cache[ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = value_cache[ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[q_begin:q_end].float().transpose(0, 1)  # [num_q_heads, query_len, head_dim]
        context = seq_len - query_len
        q_pos = torch.arange(query_len).unsqueeze(1) + context
        kv_pos = torch.arange(seq_len).unsqueeze(0)
        mask = kv_pos <= q_pos  # [query_len, seq_len], True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[q_begin:q_end] = o.transpose(0, 1).to(out.dtype)
    return out
