"""The split-KV calibration and the on-disk store every calibration shares."""

from __future__ import annotations

import json

import pytest
import torch

from quire.attention.split_calibration import SPLIT_CANDIDATES, split_min_kv
from quire.kernels import cpu_kernel
from quire.kernels.calibration_cache import RECALIBRATE_ENV, cached_measurement


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(RECALIBRATE_ENV, raising=False)
    return tmp_path / "quire" / "calibration.json"


def test_store_measures_once_per_key_and_again_on_request(fresh_cache, monkeypatch):
    calls = []

    def measure():
        calls.append(1)
        return {"n": len(calls)}

    assert cached_measurement("probe", [1], measure) == ({"n": 1}, True)
    assert cached_measurement("probe", [1], measure) == ({"n": 1}, False)  # from disk
    assert cached_measurement("probe", [2], measure) == ({"n": 2}, True)  # other parameters, other entry
    assert len(json.loads(fresh_cache.read_text())) == 2
    monkeypatch.setenv(RECALIBRATE_ENV, "1")
    assert cached_measurement("probe", [1], measure) == ({"n": 3}, True)


@pytest.mark.skipif(not cpu_kernel.is_available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_length_is_measured_once_and_is_a_candidate(fresh_cache, dtype):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chosen = split_min_kv(cpu_kernel.kernels(), 9, 3, 64, dtype)
        assert chosen in SPLIT_CANDIDATES
        (entry,) = json.loads(fresh_cache.read_text()).values()
        assert entry["split_min_kv"] == chosen
        # Every candidate was timed: the chosen one is the fastest relative to each case's best.
        assert set(entry["relative_time"]) == {str(s) for s in SPLIT_CANDIDATES}
        assert entry["relative_time"][str(chosen)] == min(entry["relative_time"].values())
        before = fresh_cache.stat().st_mtime_ns
        assert split_min_kv(cpu_kernel.kernels(), 9, 3, 64, dtype) == chosen
        assert fresh_cache.stat().st_mtime_ns == before  # served from the store
    finally:
        torch.set_num_threads(previous)


def test_one_thread_never_measures(fresh_cache):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert split_min_kv(cpu_kernel.kernels(), 9, 3, 64, torch.float32) == cpu_kernel.DEFAULT_SPLIT_MIN_KV
        assert not fresh_cache.exists()
    finally:
        torch.set_num_threads(previous)
