"""Which preempted sequences are swapped and which recomputed, measured on the machine that runs.

Preempting a sequence either copies its KV blocks to the host pool and back (swap) or drops them
and prefills its tokens again when it is readmitted (recompute). Both grow with the sequence's
length, at rates set by the machine (memory bandwidth against the model's prefill speed) and the
model (KV bytes per token against its FLOPs per token). ``preemption_mode="auto"`` swaps a single
sequence from ``swap_min_tokens`` computed tokens on; that crossover is measured here at start,
on the engine's own model and cache before any request has used them: each way is timed at two
lengths, each cost is taken as a line through its two points, and the crossover is the shortest
length at which the recompute line lies above the swap line. The result is cached on disk
(``kernels/calibration_cache.py``) under the machine, the model file and the cache's shape.
"""

from __future__ import annotations

import math
import os
import time

import torch

from quire.kernels.calibration_cache import cached_measurement
from quire.worker.cache_engine import CacheEngine
from quire.worker.model_runner import ModelRunner
from quire.worker.profiling import profile_step

CAL_BLOCKS = (1, 8)  # sequence lengths timed, in blocks
CAL_REPEATS = 3  # after one warm-up; the fastest counts


def swap_crossover(model, cache: CacheEngine, model_path: str, max_tokens: int) -> dict:
    """The shortest sequence (in tokens) whose swap costs less than its recompute, with the timings.

    Args:
        model: the engine's model (prepared); its forward runs on ``cache``'s first blocks.
        cache: the engine's cache, unused so far (its first blocks and host blocks are scratch now).
        model_path: the model's file or directory, for the cache key.
        max_tokens: the longest sequence the engine runs (``max_model_len``); a crossover above it
            means a single sequence is always recomputed.

    Returns:
        ``{"swap_min_tokens": int, "points": [[tokens, swap_ms, recompute_ms], ...], "seconds": float}``.
    """
    num_blocks, num_host = cache.kv.shape[0], cache.host_kv.shape[0]
    blocks = [b for b in CAL_BLOCKS if b <= min(num_blocks, num_host) and b * cache.block_size <= max_tokens]
    if len(blocks) < 2:
        raise ValueError("the KV pools are too small to time the preemption crossover")
    params = [os.path.abspath(model_path), _size(model_path), str(cache.kv.dtype), list(cache.kv.shape[1:]),
              cache.block_size, CAL_BLOCKS]
    entry, _ = cached_measurement("preemption_crossover", params, lambda: _measure(model, cache, blocks, max_tokens))
    return entry


def _measure(model, cache: CacheEngine, blocks: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    runner = ModelRunner(model, cache, sampler=None)
    points = []
    for n in blocks:
        tokens = n * cache.block_size
        step = profile_step(tokens, cache.block_size, 1)  # a prefill from position 0 with its one logit row
        pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)

        def swap(pairs=pairs):
            cache.swap_out(pairs)
            cache.wait_for_copies()
            cache.swap_in(pairs)
            cache.wait_for_copies()

        def recompute(step=step):
            runner.run(step)
            cache.platform.synchronize()  # the forward's queued work, where there is a queue

        points.append([tokens, 1e3 * _fastest(swap), 1e3 * _fastest(recompute)])
    (t0, s0, r0), (t1, s1, r1) = points[0], points[-1]
    # The gap (recompute minus swap) as a line in the sequence length: swap from where it turns positive.
    slope = ((r1 - s1) - (r0 - s0)) / (t1 - t0)
    if slope > 0:
        crossover = max(1, math.floor(t0 - (r0 - s0) / slope) + 1)
    else:  # the gap does not grow with length: what holds at the longer length holds beyond it
        crossover = 1 if r1 > s1 else max_tokens + 1
    return {"swap_min_tokens": int(crossover), "points": points, "seconds": time.perf_counter() - start}


def _fastest(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(CAL_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    return os.path.getsize(path)
