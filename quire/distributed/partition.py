"""Which slice of each weight a tensor-parallel rank holds: contiguous ranges, as even as possible.

Heads are split by KV head and every query head follows the KV head it reads, so attention on a
rank never needs another rank's K/V. When there are more ranks than KV heads, each KV head is
replicated on ``size / num_kv_heads`` ranks, which split its query heads. Uneven splits are
allowed (SmolLM2's 9 query / 3 KV heads on 2 ranks: 6+2 and 3+1), so no model is refused for a
head count that does not divide; the KV cache shard of each rank follows its KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_range(n: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(n)`` cut into ``parts`` contiguous pieces; the first ``n % parts`` get one more."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@dataclass(frozen=True)
class HeadShard:
    """The query and KV heads one rank computes (global head indices)."""

    q_heads: range
    kv_heads: range


def head_shard(num_heads: int, num_kv_heads: int, size: int, rank: int) -> HeadShard:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv = split_range(num_kv_heads, size, rank)
        return HeadShard(range(kv.start * group, kv.stop * group), kv)
    if size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {size} must be a multiple of the {num_kv_heads} KV heads when it exceeds them"
        )
    replicas = size // num_kv_heads
    if group < replicas:
        raise ValueError(f"tensor_parallel_size {size} leaves some ranks without query heads ({num_heads} heads)")
    kv_head, replica = divmod(rank, replicas)
    q = split_range(group, replicas, replica)
    return HeadShard(range(kv_head * group + q.start, kv_head * group + q.stop), range(kv_head, kv_head + 1))
