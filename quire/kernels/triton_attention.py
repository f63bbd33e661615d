"""Triton paged-attention kernels: the GPU path, checked on CPU under the Triton interpreter.

Three jobs, same contract as :func:`quire.attention.reference.paged_attention_reference`:

- :func:`write_kv` stores the step's new K/V rows into their cache slots (``slot_mapping``, flat
  slot = ``block * block_size + offset``; negative slots are padding and skipped).
- :func:`paged_decode` handles steps where every sequence has one query row.  A decode step has
  few rows but long contexts, so one program per (sequence, kv head) would leave most of a GPU
  idle; the context is cut into ``num_kv_splits`` ranges ("split-K", flash-decoding), each range
  yields a partial output plus its log-sum-exp, and a second kernel merges them.
- :func:`paged_prefill` handles any varlen batch (prompt chunks, chunked prefill with earlier
  chunks already cached, decode rows mixed in): a program takes a tile of one sequence's query
  rows, walks that sequence's K/V through its block table up to the tile's last position and
  applies the causal mask inside the chunk.

Both attention kernels are GQA-aware: a program serves all the query heads that share one kv head,
flattened into the rows of its query tile, so each K/V tile is loaded once per group rather than
once per query head.  K/V positions are gathered one by one through the block table
(``block_tables[s, j // block_size]``), so the tile width does not have to match ``block_size``.

Inputs may be float32, bfloat16 or float16; scores, softmax state and the output accumulator are
float32 and the result is cast back to the query dtype.  Softmax runs in base 2 (``exp2`` with the
scale pre-multiplied by log2(e)), the cheap form on GPUs.

Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1`` set before triton is imported) the
tiles are upcast to float32 before ``tl.dot``: Triton 3.9's interpreter computes bfloat16 dots
and arithmetic on the raw bits (numpy has no bfloat16), while conversions are exact.  On CUDA,
16-bit tiles go to ``tl.dot`` as they are (tensor cores, float32 accumulation) and float32 tiles
use IEEE precision rather than TF32, so float32 results match the reference closely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_kv", "paged_attention", "paged_decode", "paged_prefill"]

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    key,
    value,
    key_cache,
    value_cache,
    slot_mapping,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    c_stride_b,
    c_stride_s,
    c_stride_h,
    block_size,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    """One program per (token, kv head): copy one K row and one V row into the token's slot."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    # Scalar conditions are broadcast before ``&``: the interpreter rejects a scalar & vector mask.
    ok = (d < head_dim) & ((d * 0 + slot) >= 0)
    dst = (slot // block_size) * c_stride_b + (slot % block_size) * c_stride_s + h * c_stride_h + d
    k = tl.load(key + t * k_stride_t + h * k_stride_h + d, mask=ok)
    v = tl.load(value + t * v_stride_t + h * v_stride_h + d, mask=ok)
    tl.store(key_cache + dst, k, mask=ok)
    tl.store(value_cache + dst, v, mask=ok)


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    key_cache,
    value_cache,
    bt_row,
    kv_head,
    start,
    kv_end,
    q_pos,
    row_ok,
    d,
    d_ok,
    qk_scale,
    c_stride_b,
    c_stride_s,
    c_stride_h,
    block_size,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over K/V positions ``start .. start + BLOCK_N`` (below ``kv_end``).

    The K/V rows are gathered through the block table row ``bt_row``; the running max ``m_i``
    and sum ``l_i`` are base-2 and float32, ``acc`` is the unnormalised float32 output.
    """
    j = start + tl.arange(0, BLOCK_N)
    j_ok = j < kv_end
    blk = tl.load(bt_row + j // block_size, mask=j_ok, other=0).to(tl.int64)
    kv_off = blk * c_stride_b + (j % block_size).to(tl.int64) * c_stride_s + kv_head * c_stride_h
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(key_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(value_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [rows, BLOCK_N], base 2
    mask = row_ok[:, None] & j_ok[None, :]
    if CAUSAL:
        mask = mask & (j[None, :] <= q_pos[:, None])
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shifting by 0 instead keeps exp2 finite.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    out,
    query,
    key_cache,
    value_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    qk_scale,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    c_stride_b,
    c_stride_s,
    c_stride_h,
    bt_stride,
    block_size,
    head_dim,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (sequence, query tile, kv head); a tile is ``BLOCK_M // GROUP`` tokens x ``GROUP`` heads.

    Query row ``i`` of the chunk sits at position ``seq_len - query_len + i`` and sees K/V
    positions ``0..`` that one; the loop stops at the tile's last position, so tiles early in a
    long chunk read less of the context.
    """
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    q_begin = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_begin
    seq_len = tl.load(seq_lens + seq)
    context = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < TOKENS * GROUP) & (tok < q_len)
    q_pos = context + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_rows = (q_begin + tok).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(query + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Tiles past the chunk's end read nothing (they only exist because the grid is sized for the
    # longest chunk of the batch).
    kv_end = tl.where(tile * TOKENS < q_len, tl.minimum(seq_len, context + (tile + 1) * TOKENS), 0)
    bt_row = block_tables + seq.to(tl.int64) * bt_stride
    for start in range(0, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, key_cache, value_cache, bt_row, kv_head, start, kv_end, q_pos, row_ok,
            d, d_ok, qk_scale, c_stride_b, c_stride_s, c_stride_h, block_size,
            True, BLOCK_N, UPCAST, PRECISION,
        )  # fmt: skip
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(
        out + q_rows[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :],
        o.to(out.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _decode_split_kernel(
    part_out,
    part_lse,
    query,
    key_cache,
    value_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    qk_scale,
    q_stride_t,
    q_stride_h,
    c_stride_b,
    c_stride_s,
    c_stride_h,
    bt_stride,
    po_stride_s,
    po_stride_h,
    po_stride_k,
    pl_stride_s,
    pl_stride_h,
    block_size,
    head_dim,
    split_len,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (sequence, kv head, split): the group's query heads against one context range.

    Writes the range's normalised output and its base-2 log-sum-exp (``-inf`` for an empty range:
    splits past a short sequence's end, or a sequence with no query row this step).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_row
    seq_len = tl.load(seq_lens + seq)

    h = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + h
    row_ok = (h < GROUP) & ((h * 0 + q_len) > 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        query + q_row.to(tl.int64) * q_stride_t + head[:, None] * q_stride_h + d[None, :], mask=q_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    start = split * split_len
    end = tl.where(q_len > 0, tl.minimum(seq_len, start + split_len), 0)
    bt_row = block_tables + seq.to(tl.int64) * bt_stride
    q_pos = tl.zeros([BLOCK_H], tl.int32)  # unused: a decode row sees its whole context
    for tile_start in range(start, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, key_cache, value_cache, bt_row, kv_head, tile_start, end, q_pos, row_ok,
            d, d_ok, qk_scale, c_stride_b, c_stride_s, c_stride_h, block_size,
            False, BLOCK_N, UPCAST, PRECISION,
        )  # fmt: skip
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    seq64 = seq.to(tl.int64)
    tl.store(
        part_out + seq64 * po_stride_s + head[:, None] * po_stride_h + split * po_stride_k + d[None, :],
        o,
        mask=(h < GROUP)[:, None] & d_ok[None, :],
    )
    tl.store(part_lse + seq64 * pl_stride_s + head * pl_stride_h + split, lse, mask=h < GROUP)


@triton.jit
def _decode_reduce_kernel(
    out,
    part_out,
    part_lse,
    query_start_loc,
    o_stride_t,
    o_stride_h,
    po_stride_s,
    po_stride_h,
    po_stride_k,
    pl_stride_s,
    pl_stride_h,
    num_splits,
    head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (sequence, query head): merge the splits' outputs weighted by ``2**(lse - max lse)``."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    q_row = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_row
    k = tl.arange(0, BLOCK_S)
    k_ok = k < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    lse = tl.load(part_lse + seq * pl_stride_s + head * pl_stride_h + k, mask=k_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(k_ok & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    parts = tl.load(
        part_out + seq * po_stride_s + head * po_stride_h + k[:, None] * po_stride_k + d[None, :],
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    o = tl.sum(w[:, None] * parts, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(
        out + q_row.to(tl.int64) * o_stride_t + head * o_stride_h + d,
        o.to(out.dtype.element_ty),
        mask=d_ok & ((d * 0 + q_len) > 0),
    )


def _check(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate shapes (as the reference does) and return (group, head_dim, block_size, num_kv_heads)."""
    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError("query must be 3-D and key_cache 4-D")
    _, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_dim = key_cache.shape
    if kv_dim != head_dim or value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("cache shapes do not match the query")
    if num_q_heads % num_kv_heads:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError("query and cache rows must be contiguous in head_dim")
    return num_q_heads // num_kv_heads, head_dim, block_size, num_kv_heads


def _dot_mode(query: torch.Tensor) -> tuple[bool, str]:
    """(upcast tiles to float32, ``tl.dot`` precision): see the module docstring for why."""
    upcast = query.device.type == "cpu" or query.dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
) -> None:
    """Store each token's K/V rows at ``slot_mapping[t]``; rows with a negative slot are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if key_cache.shape[2:] != (num_kv_heads, head_dim) or value_cache.stride() != key_cache.stride():
        raise ValueError("cache shapes do not match the keys")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError("key, value and cache rows must be contiguous in head_dim")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        key_cache.shape[1], head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def paged_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """Varlen causal paged attention for any batch (prefill, chunked prefill, mixed with decodes)."""
    group, head_dim, block_size, num_kv_heads = _check(query, key_cache, value_cache)
    if out is None:
        out = torch.zeros_like(query)
    num_seqs = seq_lens.shape[0]
    block_m = max(block_m, triton.next_power_of_2(group))
    tokens_per_tile = block_m // group
    if num_seqs == 0 or max_query_len == 0:
        return out
    upcast, precision = _dot_mode(query)
    grid = (num_seqs, triton.cdiv(max_query_len, tokens_per_tile), num_kv_heads)
    _prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        block_size, head_dim,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        UPCAST=upcast, PRECISION=precision,
    )  # fmt: skip
    return out


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_kv_splits: int = 8,
    block_n: int = 32,
) -> torch.Tensor:
    """Split-K paged attention for sequences with at most one query row each.

    The split length comes from the block table's capacity (``max_blocks * block_size``), not from
    ``seq_lens``, so sizing the launch never reads device memory back to the host.
    """
    group, head_dim, block_size, num_kv_heads = _check(query, key_cache, value_cache)
    if out is None:
        out = torch.zeros_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return out
    num_q_heads = query.shape[1]
    capacity = max(block_tables.shape[1] * block_size, 1)
    split_len = triton.cdiv(triton.cdiv(capacity, num_kv_splits), block_n) * block_n
    num_splits = triton.cdiv(capacity, split_len)
    part_out = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    upcast, precision = _dot_mode(query)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        part_out, part_lse, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
        scale * _LOG2E,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        block_size, head_dim, split_len,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, PRECISION=precision,
    )  # fmt: skip
    _decode_reduce_kernel[(num_seqs, num_q_heads)](
        out, part_out, part_lse, query_start_loc,
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        num_splits, head_dim,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )  # fmt: skip
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    num_kv_splits: int = 8,
) -> torch.Tensor:
    """The split-K decode kernel when no sequence has more than one query row, else the varlen one."""
    if max_query_len <= 1:
        return paged_decode(
            query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, out, num_kv_splits
        )
    return paged_prefill(
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, out
    )
