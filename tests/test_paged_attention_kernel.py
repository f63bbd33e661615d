"""The compiled CPU paged-attention kernel against the pure-PyTorch reference."""

from __future__ import annotations

import random

import pytest
import torch

from quire.attention.reference import paged_attention_reference
from quire.kernels import cpu_kernel

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is optional
    given = None

requires_kernel = pytest.mark.skipif(
    not cpu_kernel.is_available(),
    reason="CPU paged-attention kernel could not be built (see the logged warning)",
)

TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    # Both sides accumulate in float32 from the same bf16 inputs; the outputs
    # (|x| <~ 2) then differ by at most a couple of bf16 ulps.
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 7,
    pad_value: int = 0,
    extra_table_cols: int = 2,
):
    """A random batch whose physical blocks are scattered in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq, default=0) + extra_table_cols
    block_tables = torch.full((len(seq_lens), max_blocks), pad_value, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        block_tables[s, :nb] = torch.tensor(perm[used : used + nb], dtype=torch.int32)
        used += nb
    num_tokens = sum(query_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    query = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    key_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return (
        query,
        key_cache,
        value_cache,
        block_tables,
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
    )


def check(batch, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    head_dim = batch[0].shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    got = cpu_kernel.paged_attention(*batch, scale)
    want = paged_attention_reference(*batch, scale)
    assert got.dtype == dtype and got.shape == batch[0].shape
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[dtype])
    return got


# A mixed batch: decode rows (query_len 1) next to prefill chunks with and
# without cached context, context lengths that are not multiples of the block
# size, a single-token sequence, and a long-ish sequence.
MIXED_QUERY_LENS = [1, 7, 1, 33, 1, 1, 19, 1, 64]
MIXED_CONTEXT_LENS = [40, 0, 0, 21, 129, 16, 50, 300, 3]


def test_reference_matches_naive_loop():
    """The reference itself against a scalar-style softmax loop (fp64)."""
    batch = make_batch([3, 1, 5], [4, 9, 0], 6, 2, 16, 4, torch.float32, seed=3)
    query, key_cache, value_cache, block_tables, qsl, seq_lens = batch
    scale = 0.3
    got = paged_attention_reference(*batch, scale)
    group = 3
    for s in range(3):
        q_begin, q_end = int(qsl[s]), int(qsl[s + 1])
        seq_len = int(seq_lens[s])
        for i in range(q_end - q_begin):
            pos = seq_len - (q_end - q_begin) + i
            for h in range(6):
                kh = h // group
                ks = torch.stack([key_cache[block_tables[s, j // 4], j % 4, kh] for j in range(pos + 1)]).double()
                vs = torch.stack([value_cache[block_tables[s, j // 4], j % 4, kh] for j in range(pos + 1)]).double()
                w = torch.softmax(ks @ query[q_begin + i, h].double() * scale, dim=0)
                torch.testing.assert_close(got[q_begin + i, h].double(), w @ vs, atol=1e-5, rtol=1e-5)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 8, 1])
def test_mixed_batch_gqa(dtype, block_size):
    batch = make_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 9, 3, 64, block_size, dtype, seed=block_size)
    check(batch, dtype)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [
        (4, 4, 64, 16),  # MHA
        (8, 1, 64, 16),  # MQA
        (8, 2, 128, 16),
        (6, 2, 80, 4),  # odd number of 16-lane vectors
        (4, 2, 32, 16),
        (2, 1, 16, 3),  # odd block size
        (4, 2, 256, 8),
        (32, 4, 64, 16),  # group of 8 (more rows per tile than one PV pass)
        (8, 2, 128, 32),  # decode loop: 32-token blocks hold two of its 16-position sub-blocks
        (6, 1, 128, 16),  # decode loop: group of 6 at head_dim 128 takes two register passes over V
        (14, 2, 64, 32),  # decode loop: group of 7 (6 + 1 rows per pass over V)
        (3, 1, 24, 16),  # head_dim not a multiple of 16: portable path
        (2, 2, 100, 5),  # portable path
    ],
)
def test_shapes(dtype, num_q_heads, num_kv_heads, head_dim, block_size):
    batch = make_batch(
        MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=head_dim
    )
    check(batch, dtype)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_only_many_sequences(dtype):
    rng = random.Random(7)
    n = 40
    context = [rng.randint(0, 300) for _ in range(n)]
    batch = make_batch([1] * n, context, 9, 3, 64, 16, dtype, seed=11)
    check(batch, dtype)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_portable_path_matches(dtype):
    """The scalar fallback (used for odd head sizes / no AVX-512) agrees too."""
    batch = make_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 9, 3, 64, 8, dtype, seed=5)
    scale = 64**-0.5
    got = torch.empty_like(batch[0])
    cpu_kernel._extension().paged_attention_out(*batch, scale, got, cpu_kernel.DEFAULT_SPLIT_MIN_KV, True, False)
    want = paged_attention_reference(*batch, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[dtype])


@requires_kernel
def test_padding_entries_are_never_read():
    """Block-table entries past a sequence's last block may hold anything."""
    batch = make_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 9, 3, 64, 16, torch.float32, pad_value=-12345)
    check(batch, torch.float32)


@requires_kernel
def test_out_argument_and_threads():
    batch = make_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 9, 3, 64, 16, torch.float32, seed=9)
    scale = 0.125
    want = paged_attention_reference(*batch, scale)
    out = torch.full_like(batch[0], float("nan"))
    got = cpu_kernel.paged_attention(*batch, scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(cpu_kernel.paged_attention(*batch, scale), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)


@requires_kernel
def test_strided_cache_views():
    """K/V as views into one [2, blocks, ...] tensor, and a sliced block table."""
    query, key_cache, value_cache, block_tables, qsl, seq_lens = make_batch(
        [1, 4, 1], [17, 5, 0], 4, 2, 32, 4, torch.float32, seed=2
    )
    kv = torch.stack([key_cache, value_cache], dim=1)  # [blocks, 2, bs, heads, dim]
    wide = torch.zeros(block_tables.shape[0], block_tables.shape[1] + 3, dtype=torch.int32)
    wide[:, : block_tables.shape[1]] = block_tables
    args = (query, kv[:, 0], kv[:, 1], wide[:, : block_tables.shape[1]], qsl, seq_lens, 0.2)
    torch.testing.assert_close(
        cpu_kernel.paged_attention(*args), paged_attention_reference(*args), atol=1e-5, rtol=1e-5
    )


@requires_kernel
def test_large_logits_are_stable():
    """Online softmax with big, varying logits (no overflow, no NaN)."""
    batch = make_batch([1, 9], [70, 40], 4, 2, 64, 16, torch.float32, seed=4)
    batch = (batch[0] * 30,) + batch[1:]
    scale = 64**-0.5
    got = cpu_kernel.paged_attention(*batch, scale)
    assert torch.isfinite(got).all()
    # Logits of a few hundred: fp32 rounding of the logit itself is ~1e-5, so
    # both sides are only that close to the exact answer.
    torch.testing.assert_close(got, paged_attention_reference(*batch, scale), atol=1e-4, rtol=1e-4)


@requires_kernel
def test_empty_and_zero_length_query():
    query, key_cache, value_cache, block_tables, qsl, seq_lens = make_batch([2, 1], [3, 4], 4, 2, 32, 4, torch.float32)
    # A third sequence with no new tokens in this step.
    qsl = torch.cat([qsl, qsl[-1:]])
    seq_lens = torch.cat([seq_lens, torch.tensor([5], dtype=torch.int32)])
    block_tables = torch.cat([block_tables, block_tables[:1]])
    args = (query, key_cache, value_cache, block_tables, qsl, seq_lens, 0.3)
    torch.testing.assert_close(
        cpu_kernel.paged_attention(*args), paged_attention_reference(*args), atol=1e-5, rtol=1e-5
    )
    empty = cpu_kernel.paged_attention(
        query[:0],
        key_cache,
        value_cache,
        block_tables[:0],
        torch.zeros(1, dtype=torch.int32),
        seq_lens[:0],
        0.3,
    )
    assert empty.shape == (0, 4, 32)


@requires_kernel
def test_bad_inputs_raise():
    query, key_cache, value_cache, block_tables, qsl, seq_lens = make_batch([2, 1], [3, 4], 4, 2, 32, 4, torch.float32)
    bad_table = block_tables.clone()
    bad_table[0, 0] = key_cache.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernel.paged_attention(query, key_cache, value_cache, bad_table, qsl, seq_lens, 0.3)
    with pytest.raises(RuntimeError, match="smaller than its query length"):
        cpu_kernel.paged_attention(
            query, key_cache, value_cache, block_tables, qsl, torch.tensor([1, 5], dtype=torch.int32), 0.3
        )
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernel.paged_attention(query.bfloat16(), key_cache, value_cache, block_tables, qsl, seq_lens, 0.3)
    with pytest.raises(RuntimeError, match="multiple"):
        cpu_kernel.paged_attention(query[:, :3], key_cache, value_cache, block_tables, qsl, seq_lens, 0.3)
    with pytest.raises(RuntimeError, match="int32"):
        cpu_kernel.paged_attention(query, key_cache, value_cache, block_tables.long(), qsl, seq_lens, 0.3)


if given is not None:

    @requires_kernel
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        data=st.data(),
        group=st.sampled_from([1, 2, 3]),
        num_kv_heads=st.integers(1, 3),
        head_dim=st.sampled_from([16, 32, 48, 64, 24]),
        block_size=st.sampled_from([1, 2, 5, 8, 16]),
        dtype=st.sampled_from([torch.float32, torch.bfloat16]),
        seed=st.integers(0, 2**16),
    )
    def test_property_random_batches(data, group, num_kv_heads, head_dim, block_size, dtype, seed):
        num_seqs = data.draw(st.integers(1, 5), label="num_seqs")
        query_lens = data.draw(st.lists(st.integers(0, 40), min_size=num_seqs, max_size=num_seqs), label="qlens")
        context_lens = data.draw(st.lists(st.integers(0, 70), min_size=num_seqs, max_size=num_seqs), label="ctx")
        # A sequence needs at least one KV position if it has query rows.
        batch = make_batch(
            query_lens, context_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=seed
        )
        check(batch, dtype)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 5])
def test_split_kv_decode_few_sequences(dtype, block_size):
    """Few long decode sequences: the kernel cuts them into KV ranges across threads."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for query_lens, context in (([1], [1500]), ([1, 1], [700, 2049]), ([1, 1], [40, 3000])):
            batch = make_batch(query_lens, context, 8, 1, 64, block_size, dtype, seed=len(context))
            check(batch, dtype)
    finally:
        torch.set_num_threads(previous)
