"""The KV pool's host memory: 2 MB pages where Linux offers them."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from quire.worker.cache_engine import advise_huge_pages

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def smaps_kb(address: int, field: str) -> int:
    """``field`` (e.g. "Rss", "AnonHugePages") of the /proc/self/smaps entry that contains ``address``, in KB."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def huge_kb_of_mapping(address: int) -> int:
    return smaps_kb(address, "AnonHugePages")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages unavailable")
def test_a_large_pool_is_backed_by_huge_pages_once_written():
    pool = torch.empty(64 * 2**20, dtype=torch.uint8)
    assert advise_huge_pages(pool)
    pool.fill_(1)
    # madvise splits the mapping at the advised range: look up the one holding the middle.
    assert huge_kb_of_mapping(pool.data_ptr() + pool.nbytes // 2) >= 32 * 1024  # most of the 64 MB
    assert not advise_huge_pages(torch.empty(1024, dtype=torch.uint8))  # too small to bother


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_the_engine_has_the_whole_kv_pool_backed_before_the_first_request(llm_fp32):
    """LLM() returns with every page of the KV pool resident (CacheEngine.back_pages), so no step
    pays for first-touching blocks; the pool is the default budget, gigabytes, none of it used yet."""
    kv = llm_fp32.engine.cache.kv
    assert kv.nbytes > 2**30
    # madvise may split the pool's mapping at its 4 KB-aligned ends: the one holding its middle
    # covers all but those ends.
    resident = smaps_kb(kv.data_ptr() + kv.nbytes // 2, "Rss") * 1024
    assert resident >= kv.nbytes - 2 * 2**21
