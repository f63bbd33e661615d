"""The KV pool's host memory: 2 MB pages where Linux offers them."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from quire.worker.cache_engine import advise_huge_pages

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kb_of_mapping(address: int) -> int:
    """AnonHugePages of the /proc/self/smaps entry that contains ``address``."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages unavailable")
def test_a_large_pool_is_backed_by_huge_pages_once_written():
    pool = torch.empty(64 * 2**20, dtype=torch.uint8)
    assert advise_huge_pages(pool)
    pool.fill_(1)
    # madvise splits the mapping at the advised range: look up the one holding the middle.
    assert huge_kb_of_mapping(pool.data_ptr() + pool.nbytes // 2) >= 32 * 1024  # most of the 64 MB
    assert not advise_huge_pages(torch.empty(1024, dtype=torch.uint8))  # too small to bother
