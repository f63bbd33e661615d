"""The profiling forward: how much device memory the engine's largest step needs, before the KV pool exists.

The pool takes whatever memory is left, so what is left must be known first. One forward over a
step of ``max_num_batched_tokens`` prompt tokens, with logits for as many rows as a step can
sample, reaches the activations' peak; it runs on a scratch cache just large enough for it, which
is freed afterwards.
"""

from __future__ import annotations

import torch

from quire.config import EngineConfig
from quire.models.config import ArchConfig
from quire.worker.cache_engine import CacheEngine
from quire.worker.model_runner import ModelRunner
from quire.worker.platform import Platform
from quire.worker.step_inputs import StepInputs


def profile_step(num_tokens: int, block_size: int, logit_rows: int) -> StepInputs:
    """One sequence of ``num_tokens`` prompt tokens from position 0, in blocks 0, 1, ...; logits for its last rows."""
    num_blocks = -(-num_tokens // block_size)
    rows = min(logit_rows, num_tokens)
    return StepInputs(
        input_ids=torch.zeros(num_tokens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        starts=torch.zeros(1, dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32).view(1, -1),
        logit_rows=torch.arange(num_tokens - rows, num_tokens, dtype=torch.int32),
    )


def profile_forward(
    model, arch: ArchConfig, dtype: torch.dtype, platform: Platform, config: EngineConfig, num_kv_heads: int
) -> int | None:
    """Peak device bytes in use during the largest step (None where the device keeps no such figure: a CPU)."""
    scheduler = config.scheduler
    num_tokens = min(scheduler.max_num_batched_tokens, scheduler.max_model_len)
    block_size = config.cache.block_size
    step = profile_step(num_tokens, block_size, scheduler.max_num_seqs)
    with platform.measure_peak() as peak:
        cache = CacheEngine(arch, step.block_tables.shape[1], block_size, dtype, platform.device, num_kv_heads)
        ModelRunner(model, cache, sampler=None).run(step)
        del cache
    platform.release_cached()
    return peak[0]
