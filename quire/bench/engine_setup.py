"""The real engine for trace benchmarks: loaded once, its KV cache rebuilt per block size.

``quire bench memory`` and ``quire bench block-size`` serve several traces with one loaded
model. Loading takes tens of seconds, so instead of a new ``LLMEngine`` per block size the
engine's KV tensor and model runner (the only pieces that depend on the block size) are
rebuilt; the scheduler is replaced per run by ``trace_runner.EngineExecutor``.
"""

from __future__ import annotations

from collections.abc import Sequence

from quire.config import EngineArgs

__all__ = ["load_engine", "set_kv_layout", "warm_up"]


def load_engine(
    model: str | None,
    kv_slots: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    dtype: str = "auto",
    num_threads: int | None = None,
):
    """An ``LLMEngine`` with exactly ``kv_slots // block_size`` KV blocks and prefix caching off."""
    from quire.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=model,
        dtype=dtype,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_kv_blocks=max(1, kv_slots // block_size),
        enable_prefix_caching=False,
        num_threads=num_threads,
    )
    return LLMEngine(args)


def set_kv_layout(engine, block_size: int, kv_slots: int) -> None:
    """Give ``engine`` a fresh KV tensor of ``kv_slots // block_size`` blocks of ``block_size`` and a runner for it."""
    from quire.worker.cache_engine import CacheEngine
    from quire.worker.model_runner import ModelRunner

    num_blocks = max(1, kv_slots // block_size)
    if engine.runner.block_size == block_size and engine.cache.num_blocks == num_blocks:
        return
    engine.cache = None  # free the old tensor before allocating the new one
    engine.cache = CacheEngine(engine.arch, num_blocks, block_size, engine.dtype, engine.device)
    engine.runner = ModelRunner(engine.model, engine.cache, engine.runner.sampler, engine.device)


def warm_up(engine, tokens: Sequence[int]) -> None:
    """One short request first, so the first timed step does not pay one-off costs (kernel load, allocations)."""
    from quire.core.kv_cache_manager import KVCacheManager
    from quire.core.scheduler import Scheduler
    from quire.sampling_params import SamplingParams

    kv_cache = KVCacheManager(engine.cache.num_blocks, engine.cache.block_size)  # matches the current KV tensor
    engine.scheduler = Scheduler(engine.scheduler.config, kv_cache)
    engine.kv_cache = kv_cache
    engine.add_request(f"warm-up-{id(engine.runner)}", list(tokens[:32]), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
