"""The Triton paged-attention kernels against the pure-PyTorch reference, on CPU under the interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, hence at the top of this module.
Every case builds a paged KV cache with shuffled block tables (some blocks shared between
sequences, as after a fork), fills the slots no sequence owns with NaN so a read past a sequence's
end or through a wrong block poisons the output, and compares with ``paged_attention_reference``
on the same tables.  Shapes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'quire[gpu]')")

from quire import LLM, SamplingParams  # noqa: E402
from quire.attention.backend import AttentionMetadata  # noqa: E402
from quire.attention.reference import paged_attention_reference  # noqa: E402
from quire.attention.selector import build_attention_backend  # noqa: E402
from quire.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from quire.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from quire.config import EngineArgs  # noqa: E402
from quire.kernels import triton_attention as ta  # noqa: E402

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    # Both sides accumulate in float32 and round once to the 16-bit output: a unit or two in the last place.
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def _paged_case(
    seqs: list[tuple[int, int]],  # (seq_len, query_len) per sequence
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    shared_blocks: int = 0,
    seed: int = 0,
):
    """A cache, block tables, queries and metadata for ``seqs``.

    Sequence 1 shares its first ``shared_blocks`` (full) blocks with sequence 0, as a forked
    child does; the other blocks are drawn without replacement from a shuffled pool.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    max_blocks = max(blocks_per_seq) + 1  # one padding column
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)
    for s, n in enumerate(blocks_per_seq):
        for b in range(n):
            if s == 1 and b < shared_blocks:
                block_tables[1, b] = block_tables[0, b]
            else:
                block_tables[s, b] = pool.pop()

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    for s, (seq_len, _) in enumerate(seqs):
        for j in range(seq_len):
            blk, off = int(block_tables[s, j // block_size]), j % block_size
            if s == 1 and j // block_size < shared_blocks:
                continue  # written by sequence 0
            key_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            value_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)

    query_lens = [q for _, q in seqs]
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, max(query_lens)


def _reference(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale):
    return paged_attention_reference(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale)


# -- write_kv --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_is_exact_and_touches_only_its_slots(dtype):
    """Each row lands bit-for-bit in its slot, from a strided view (a slice of a fused projection);
    a negative slot (padding) writes nothing, and every other slot keeps its old contents."""
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 5, 2, 64
    qkv = torch.randn(7, (4 + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    key = qkv[:, 4 * head_dim : (4 + num_kv_heads) * head_dim].view(7, num_kv_heads, head_dim)
    value = qkv[:, (4 + num_kv_heads) * head_dim :].view(7, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.tensor([3, 29, 4, -1, 10, 17, 0], dtype=torch.int64)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    keep = slots >= 0
    want_k.view(-1, num_kv_heads, head_dim)[slots[keep]] = key[keep]
    want_v.view(-1, num_kv_heads, head_dim)[slots[keep]] = value[keep]

    ta.write_kv(key, value, key_cache, value_cache, slots)

    assert torch.equal(key_cache, want_k)
    assert torch.equal(value_cache, want_v)


# -- decode (split-K) ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_k_matches_reference(group, head_dim, dtype):
    """One query row per sequence; contexts span several splits and end mid-block.

    Capacity is 10 blocks x 16 = 160 positions; 4 splits of 48 (rounded to the 16-wide tile), so
    the 150-token sequence is merged from 4 partial results, the 37-token one from 1 plus 3 empty
    splits, and sequence 1 reads two blocks it shares with sequence 0.
    """
    seqs = [(150, 1), (37, 1), (1, 1), (100, 1)]
    case = _paged_case(
        seqs, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16, dtype=dtype, shared_blocks=2
    )
    query, key_cache, value_cache, block_tables, qsl, seq_lens, _ = case
    scale = head_dim**-0.5
    got = ta.paged_decode(
        query, key_cache, value_cache, block_tables, qsl, seq_lens, scale, num_kv_splits=4, block_n=16
    )
    want = _reference(query, key_cache, value_cache, block_tables, qsl, seq_lens, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("num_kv_splits", [1, 3, 16])
def test_decode_split_count_does_not_change_the_result(num_kv_splits):
    """The log-sum-exp merge is exact up to rounding whatever the number of splits (16 splits
    here leave most of them empty for the short sequence)."""
    seqs = [(77, 1), (9, 1)]
    case = _paged_case(seqs, num_kv_heads=1, group=4, head_dim=64, block_size=8, dtype=torch.float32, seed=3)
    query, key_cache, value_cache, block_tables, qsl, seq_lens, _ = case
    got = ta.paged_decode(
        query, key_cache, value_cache, block_tables, qsl, seq_lens, 0.125, num_kv_splits=num_kv_splits
    )
    want = _reference(query, key_cache, value_cache, block_tables, qsl, seq_lens, 0.125)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# -- prefill, chunked prefill, mixed batches -------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prefill_chunk_and_decode_match_reference(group, head_dim, dtype):
    """A whole prompt, a later chunk of a prompt whose first 45 tokens are already cached (through
    blocks shared with sequence 0), a decode row and another short prompt, in one varlen batch.
    Block size 16 with lengths that are not multiples of it."""
    seqs = [(40, 40), (58, 13), (33, 1), (7, 7)]
    case = _paged_case(
        seqs, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16, dtype=dtype, shared_blocks=2
    )
    query, key_cache, value_cache, block_tables, qsl, seq_lens, max_query_len = case
    scale = head_dim**-0.5
    got = ta.paged_prefill(query, key_cache, value_cache, block_tables, qsl, seq_lens, scale, max_query_len)
    want = _reference(query, key_cache, value_cache, block_tables, qsl, seq_lens, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_chunked_prefill_any_block_size(block_size):
    """Tiles are gathered position by position, so a block size smaller than, not dividing, or
    larger than the 32-wide tile all read the right rows; float16 for the third dtype."""
    seqs = [(70, 20), (26, 26)]
    case = _paged_case(seqs, num_kv_heads=2, group=2, head_dim=64, block_size=block_size, dtype=torch.float16, seed=5)
    query, key_cache, value_cache, block_tables, qsl, seq_lens, max_query_len = case
    got = ta.paged_prefill(query, key_cache, value_cache, block_tables, qsl, seq_lens, 0.125, max_query_len)
    want = _reference(query, key_cache, value_cache, block_tables, qsl, seq_lens, 0.125)
    torch.testing.assert_close(got, want, **TOL[torch.float16])


# -- the backend -----------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_only", [False, True])
def test_backend_forward_matches_torch_backend(decode_only):
    """``TritonAttentionBackend.forward`` writes the step's K/V, then attends (split-K for a
    decode-only step, the varlen kernel otherwise): same cache and output as the pure-PyTorch path."""
    gen = torch.Generator().manual_seed(7)
    num_kv_heads, group, head_dim, block_size = 2, 3, 64, 4
    seqs = [(11, 1), (6, 1)] if decode_only else [(11, 1), (6, 6), (9, 4)]
    case = _paged_case([(s - q, 0) for s, q in seqs], num_kv_heads, group, head_dim, block_size, torch.float32, seed=7)
    _, key_cache, value_cache, _, _, _, _ = case
    # Extend the cache with blocks for the new tokens and lay out the tables by hand.
    extra = 8
    pad = torch.full((extra, block_size, num_kv_heads, head_dim), float("nan"))
    key_cache = torch.cat([key_cache, pad])
    value_cache = torch.cat([value_cache, pad.clone()])
    base = case[3]
    tables = torch.full((len(seqs), 4), -1, dtype=torch.int32)
    slots, next_free = [], key_cache.shape[0] - extra
    for s, (seq_len, q_len) in enumerate(seqs):
        for b in range((seq_len + block_size - 1) // block_size):
            if base.shape[1] > b and base[s, b] >= 0:
                tables[s, b] = base[s, b]
            else:
                tables[s, b], next_free = next_free, next_free + 1
        for j in range(seq_len - q_len, seq_len):
            slots.append(int(tables[s, j // block_size]) * block_size + j % block_size)
    num_tokens = len(slots)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    q_lens = [q for _, q in seqs]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        max_query_len=max(q_lens),
    )
    backend = TritonAttentionBackend(num_kv_splits=2)
    assert backend.fuses_qkv is False
    kc, vc = key_cache.clone(), value_cache.clone()
    got = backend.forward(query, key, value, kc, vc, metadata, 0.125)
    rk, rv = key_cache.clone(), value_cache.clone()
    want = TorchAttentionBackend(use_kernel=False).forward(query, key, value, rk, rv, metadata, 0.125)
    assert torch.equal(kc.nan_to_num(), rk.nan_to_num())
    assert torch.equal(vc.nan_to_num(), rv.nan_to_num())
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# -- the engine option -----------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    """``auto`` is the CPU kernel on a CPU device; ``triton`` there needs the interpreter switched on,
    and without it is refused with the reason instead of failing at the first forward."""
    cpu = torch.device("cpu")
    assert isinstance(build_attention_backend("auto", cpu), TorchAttentionBackend)
    assert isinstance(build_attention_backend("triton", cpu), TritonAttentionBackend)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        build_attention_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineArgs(attention_backend="cuda").validate()


@pytest.mark.slow
def test_default_model_greedy_outputs_equal_on_triton_backend():
    """The embedded model end to end with every layer's attention in the Triton kernels (prefill
    through the varlen kernel, then decode steps): the greedy tokens equal the CPU backend's.

    These contexts fit in one split of the decode kernel, so the split merge is left to the
    kernel tests above; a broken causal mask or block-table read fails here."""
    params = SamplingParams(temperature=0, max_tokens=6)
    prompts = ["The capital of France is", "Count: 1, 2, 3,"]
    outputs = {}
    for name in ("cpu", "triton"):
        llm = LLM(dtype="float32", num_kv_blocks=16, attention_backend=name)
        assert type(llm.engine.attention) is {"cpu": TorchAttentionBackend, "triton": TritonAttentionBackend}[name]
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["cpu"]
