"""KV allocators by name: the one place that turns ``CacheConfig.kv_allocator`` into an allocator.

The engine and the simulated benchmarks both build their allocator here, so a policy name means
the same thing everywhere. The names themselves live in ``quire.config.KV_ALLOCATORS`` (config
validates them without importing the allocators).
"""

from __future__ import annotations

from quire.config import KV_ALLOCATORS
from quire.core.kv_allocator import KVAllocator
from quire.core.kv_cache_manager import KVCacheManager
from quire.core.reservation_allocator import Policy, ReservationAllocator, StaticBatchAllocator

__all__ = ["build_kv_allocator"]

_POLICIES = {"orca-max": Policy.MAX, "orca-pow2": Policy.POW2, "orca-oracle": Policy.ORACLE}


def build_kv_allocator(
    name: str,
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    enable_prefix_caching: bool = False,
    num_host_blocks: int = 0,
) -> KVAllocator:
    """A fresh allocator ``name`` over ``num_blocks`` blocks of ``block_size`` token slots.

    ``enable_prefix_caching`` and ``num_host_blocks`` apply to the paged manager only: the
    reservation policies have neither a prefix cache nor a host pool.
    """
    if name not in KV_ALLOCATORS:
        raise ValueError(f"kv_allocator must be one of {KV_ALLOCATORS}, got {name!r}.")
    if name == "paged":
        return KVCacheManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
    if name == "static":
        return StaticBatchAllocator(num_blocks, block_size, max_model_len)
    return ReservationAllocator(num_blocks, block_size, _POLICIES[name], max_model_len)
