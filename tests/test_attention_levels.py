"""Paged attention of every ISA level this CPU runs against the reference.

Each level is its own library (``cpu_kernel.kernels(level)``): the scalar loops, the portable
Vectorized<float> path (avx2, neon; avx512 for head sizes its own path does not take) and the
hand-written AVX-512 path. The reference of a case is computed once and shared by all levels.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_paged_attention_kernel import (
    MIXED_CONTEXT_LENS,
    MIXED_QUERY_LENS,
    TOLERANCES,
    make_batch,
)

from quire.attention.reference import paged_attention_reference
from quire.attention.split_calibration import SPLIT_CANDIDATES
from quire.kernels import cpu_kernel

LEVELS = cpu_kernel.isa_levels()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> (query lens, context lens, q heads, kv heads, head_dim, block_size).  The mixed batch
# has decode rows, prefill chunks with and without cached context (prefix) and tiles of many rows.
SHAPES = {
    "g1_d64_b32": (4, 4, 64, 32),
    "g2_d128_b16": (4, 2, 128, 16),
    "g3_d64_b16": (9, 3, 64, 16),
    "g4_d80_b16": (8, 2, 80, 16),  # 80: 10 AVX2 vectors, 5 AVX-512 ones
    "g5_d64_b32": (5, 1, 64, 32),
    "g6_d96_b16": (12, 2, 96, 16),
    "g7_d128_b32": (7, 1, 128, 32),
    "g8_d80_b32": (16, 2, 80, 32),
    "g2_d24_b16": (4, 2, 24, 16),  # 24: a multiple of 8 but not of 16
    "g3_d100_b5": (3, 1, 100, 5),  # no vector path: scalar loops everywhere
}
MIXED = {name: (MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, *shape) for name, shape in SHAPES.items()}
# Few long decode sequences: with 2 threads they are cut into KV ranges (split-KV) and merged.
SPLIT = {
    "split_g8_d64_b16": ([1], [1500], 8, 1, 64, 16),
    "split_g3_d80_b32": ([1, 1], [700, 2049], 6, 2, 80, 32),
    "split_g1_d128_b16": ([1, 1], [40, 3000], 2, 2, 128, 16),
}
CASES = {**MIXED, **SPLIT}


@functools.cache
def case(name: str, dtype_name: str):
    query_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size = CASES[name]
    batch = make_batch(
        query_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, DTYPES[dtype_name], seed=head_dim
    )
    scale = head_dim**-0.5
    return batch, scale, paged_attention_reference(*batch, scale)


def run(
    level: str, batch, scale: float, force_generic: bool = False, split: int = cpu_kernel.DEFAULT_SPLIT_MIN_KV
) -> torch.Tensor:
    ops = cpu_kernel.kernels(level)
    if ops is None:
        pytest.skip(f"the {level} kernels could not be built (see the logged warning)")
    out = torch.full_like(batch[0], float("nan"))
    ops.paged_attention_out(*batch, scale, out, split, force_generic, False)
    return out


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("level", LEVELS)
def test_level_matches_reference(level, name, dtype_name, two_threads):
    batch, scale, want = case(name, dtype_name)
    got = run(level, batch, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[DTYPES[dtype_name]])


@pytest.mark.parametrize("split", SPLIT_CANDIDATES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(SPLIT))
@pytest.mark.parametrize("level", LEVELS)
def test_level_every_split_length(level, name, dtype_name, split, two_threads):
    """Every KV range length the calibration may choose (0: no split) gives the reference's result."""
    batch, scale, want = case(name, dtype_name)
    got = run(level, batch, scale, split=split)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[DTYPES[dtype_name]])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("level", LEVELS)
def test_level_generic_path(level, dtype_name):
    """force_generic: the scalar loops of each build agree with the reference too."""
    batch, scale, want = case("g3_d64_b16", dtype_name)
    got = run(level, batch, scale, force_generic=True)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[DTYPES[dtype_name]])


@pytest.mark.parametrize("level", LEVELS)
def test_level_large_logits(level):
    """Big, varying logits through the online softmax of each level: finite, and close."""
    batch = make_batch([1, 9, 70], [70, 40, 0], 8, 2, 64, 16, torch.float32, seed=4)
    batch = (batch[0] * 30,) + batch[1:]
    scale = 64**-0.5
    got = run(level, batch, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, paged_attention_reference(*batch, scale), atol=1e-4, rtol=1e-4)
