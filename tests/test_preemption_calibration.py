"""The swap/recompute crossover of "auto" preemption, measured on the real default model."""

from __future__ import annotations

import pytest

from quire.worker.cache_engine import CacheEngine
from quire.worker.preemption_calibration import CAL_BLOCKS, swap_crossover


@pytest.fixture
def scratch_cache(llm_fp32):
    engine = llm_fp32.engine
    return CacheEngine(engine.arch, 16, 16, engine.dtype, "cpu", engine.num_local_kv_heads, num_host_blocks=16)


def test_crossover_follows_the_measured_costs(llm_fp32, scratch_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = llm_fp32.engine
    found = swap_crossover(engine.model, scratch_cache, engine.config.model.model, engine.max_model_len)
    points = found["points"]
    assert [p[0] for p in points] == [16 * b for b in CAL_BLOCKS]
    assert all(swap > 0 and recompute > 0 for _, swap, recompute in points)
    crossover = found["swap_min_tokens"]
    (t0, s0, r0), (t1, s1, r1) = points

    slope = ((r1 - s1) - (r0 - s0)) / (t1 - t0)  # of the gap, recompute minus swap, in the length
    if slope > 0:  # the gap grows: swap from the first length where it is positive
        expected = next(t for t in range(1, 10**7) if (r0 - s0) + slope * (t - t0) > 0)
    else:  # it does not grow: the longer length decides
        expected = 1 if r1 > s1 else engine.max_model_len + 1
    assert crossover == expected
    # Stored: a second engine start reads it instead of measuring.
    again = swap_crossover(engine.model, scratch_cache, engine.config.model.model, engine.max_model_len)
    assert again == found


def test_engine_schedules_with_the_measured_crossover(llm_fp32, scratch_cache):
    """The engine's scheduler uses what the calibration stored for this machine and model."""
    engine = llm_fp32.engine
    stored = swap_crossover(engine.model, scratch_cache, engine.config.model.model, engine.max_model_len)
    assert engine.scheduler.config.swap_min_tokens == stored["swap_min_tokens"]
