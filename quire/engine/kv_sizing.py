"""How many KV blocks the engine allocates, on the device and on the host (for swapping)."""

from __future__ import annotations

from quire.config import CacheConfig
from quire.models.loader import available_memory_bytes
from quire.worker.platform import Platform

# Default KV budget: this share of available memory, capped.
_KV_MEMORY_FRACTION = 0.3
_KV_MEMORY_CAP_GB = 4.0


def num_kv_blocks(cache: CacheConfig, bytes_per_block: int, check_memory: bool) -> int:
    """Device blocks: ``num_kv_blocks`` if set, else what ``kv_cache_memory_gb`` (or the default budget) buys.

    ``check_memory`` (a CPU pool): the whole pool is written at start-up (CacheEngine.back_pages);
    one larger than the memory left would have the OS kill the process there, so it is refused
    with a clear error instead.
    """
    available = available_memory_bytes()
    if cache.num_kv_blocks is not None:
        num_blocks, field = cache.num_kv_blocks, f"num_kv_blocks={cache.num_kv_blocks}"
    else:
        if cache.kv_cache_memory_gb is not None:
            budget = cache.kv_cache_memory_gb * 2**30
        else:
            budget = min(_KV_MEMORY_FRACTION * available, _KV_MEMORY_CAP_GB * 2**30)
        num_blocks, field = int(budget // bytes_per_block), f"kv_cache_memory_gb={cache.kv_cache_memory_gb}"
        if num_blocks < 1:
            raise ValueError(f"{field} is too small for one KV block.")
    if check_memory and num_blocks * bytes_per_block > available:
        raise ValueError(
            f"{field}: a KV pool of {num_blocks * bytes_per_block / 2**30:.2f} GiB does not fit in the "
            f"{available / 2**30:.2f} GiB of memory available."
        )
    return num_blocks


def num_host_blocks(cache: CacheConfig, bytes_per_block: int) -> int:
    """Host blocks: ``num_host_kv_blocks`` if set, else what ``swap_space_gb`` buys."""
    if cache.num_host_kv_blocks is not None:
        return cache.num_host_kv_blocks
    return int(cache.swap_space_gb * 2**30 // bytes_per_block)


def needs_profile(cache: CacheConfig, platform: Platform) -> bool:
    """A GPU pool without an explicit size is sized from a profiling forward (``kv_blocks_from_profile``)."""
    return platform.is_cuda and cache.num_kv_blocks is None and cache.kv_cache_memory_gb is None


def kv_blocks_from_profile(cache: CacheConfig, bytes_per_block: int, platform: Platform, peak_bytes: int) -> int:
    """vLLM's rule: the pool gets ``gpu_memory_utilization`` of the device's memory, less what the
    profiling forward's peak held (weights, activations, and memory outside PyTorch's allocator).

    Args:
        peak_bytes: ``profile_forward``'s figure for this device.
    Returns:
        The device block count.
    """
    _, total = platform.memory()
    budget = int(total * cache.gpu_memory_utilization) - peak_bytes
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization={cache.gpu_memory_utilization}: the model and its largest step already "
            f"hold {peak_bytes / 2**30:.2f} GiB of the {total * cache.gpu_memory_utilization / 2**30:.2f} GiB "
            "allowed, leaving no room for KV blocks; raise it, or lower max_num_batched_tokens."
        )
    return num_blocks
