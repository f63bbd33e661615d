"""How long a KV range a decode item of the CPU attention kernel is cut into, measured here.

A decode step of few sequences has few (sequence, KV head) work items, fewer than the threads. The
kernel then cuts long items into KV ranges of at least ``split_min_kv`` positions ("split-KV",
flash decoding) and merges the ranges' partial softmax results. Short ranges give every thread
work but add merges and per-range overhead; long ones leave threads idle. Where that balances
depends on the CPU (cores, caches, bandwidth), the head shape and the dtype, so it is measured:
on first use, decode attention at a few context lengths is timed with each candidate length (and
with no split at all), taking turns, and the candidate with the least total time relative to the
best at each length is kept. The result is cached on disk like the linear calibration
(``kernels/calibration_cache.py``).
"""

from __future__ import annotations

import logging
import time

import torch

from quire.kernels import cpu_kernel
from quire.kernels.calibration_cache import cached_measurement

logger = logging.getLogger(__name__)

SPLIT_CANDIDATES = (0, 128, 256, 512, 1024, 2048)  # shortest KV range of a split item; 0: never split
CAL_CASES = ((1, 512), (1, 2048), (1, 8192), (2, 2048))  # (decode sequences, context length) timed
CAL_BLOCK_SIZE = 16
CAL_CACHE_BYTES = 64 << 20  # K/V copies timed in turn, up to this size, so a round is not all cache hits
CAL_REPEATS = 5  # timed rounds after one warm-up round; the fastest counts


def split_min_kv(kernels, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The shortest KV range (in positions) the kernel cuts a decode item into on this machine.

    Args:
        kernels: the compiled op namespace (``cpu_kernel.kernels()``), or None.
        num_q_heads, num_kv_heads, head_dim: the attention layer's shape (one rank's heads).
        dtype: the query and KV cache dtype.

    Returns:
        The calibrated length (0: never split); the kernel's default without kernels or with one
        thread (where the kernel never splits).
    """
    if kernels is None or torch.get_num_threads() < 2:
        return cpu_kernel.DEFAULT_SPLIT_MIN_KV
    params = [cpu_kernel.level_of(kernels), cpu_kernel.source_tag(), str(dtype), num_q_heads, num_kv_heads,
              head_dim, SPLIT_CANDIDATES, CAL_CASES]
    entry, measured = cached_measurement(
        "attention_split", params, lambda: _measure(kernels, num_q_heads, num_kv_heads, head_dim, dtype)
    )
    if measured:
        logger.info(
            "calibrated split-KV decode (%d/%d heads x %d, %s, %.2f s): KV ranges of >= %s positions",
            num_q_heads, num_kv_heads, head_dim, dtype, entry["seconds"], entry["split_min_kv"] or "inf",
        )
    return entry["split_min_kv"]


def _measure(kernels, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    relative = dict.fromkeys(SPLIT_CANDIDATES, 0.0)
    for num_seqs, context in CAL_CASES:
        calls = _decode_calls(kernels, num_seqs, context, num_q_heads, num_kv_heads, head_dim, dtype, gen)
        fastest = dict.fromkeys(SPLIT_CANDIDATES, float("inf"))
        for round_ in range(CAL_REPEATS + 1):
            for split in SPLIT_CANDIDATES:
                t0 = time.perf_counter()
                for call in calls:
                    call(split)
                if round_:  # the first round warms up
                    fastest[split] = min(fastest[split], time.perf_counter() - t0)
        best = min(fastest.values())
        for split in SPLIT_CANDIDATES:
            relative[split] += fastest[split] / best
    chosen = min(SPLIT_CANDIDATES, key=lambda s: relative[s])
    return {
        "split_min_kv": chosen,
        "relative_time": {str(s): round(r / len(CAL_CASES), 3) for s, r in relative.items()},
        "seconds": time.perf_counter() - start,
    }


def _decode_calls(kernels, num_seqs, context, num_q_heads, num_kv_heads, head_dim, dtype, gen) -> list:
    """One decode call per K/V copy: ``num_seqs`` one-token queries over ``context`` cached positions
    each, their blocks scattered through the pool as a running engine's are."""
    blocks_per_seq = -(-context // CAL_BLOCK_SIZE)
    copy_bytes = 2 * num_seqs * blocks_per_seq * CAL_BLOCK_SIZE * num_kv_heads * head_dim * dtype.itemsize
    copies = max(1, min(4, CAL_CACHE_BYTES // copy_bytes))
    num_blocks = copies * num_seqs * blocks_per_seq
    shape = (num_blocks, CAL_BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(copies, num_seqs, blocks_per_seq)
    query = torch.randn(num_seqs, num_q_heads, head_dim, generator=gen).to(dtype)
    out = torch.empty_like(query)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32)
    scale = head_dim**-0.5

    def call(tables: torch.Tensor):
        return lambda split: kernels.paged_attention_out(
            query, key_cache, value_cache, tables, query_start_loc, seq_lens, scale, out, split
        )

    return [call(order[c].contiguous()) for c in range(copies)]
