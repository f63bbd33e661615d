"""The pool of physical KV blocks: free list and reference counts."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids and counts how many block tables point at each block.

    A block returns to the free list when its last reference is dropped. Blocks with more
    than one reference are shared (forked sequences, cached prefixes) and must be copied
    before they are written.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV block pool exhausted: the caller must check num_free first.")
        block = self._free.popleft()
        assert self.ref_counts[block] == 0, f"free block {block} still referenced"
        self.ref_counts[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"incref on free block {block}"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        count = self.ref_counts[block]
        assert count > 0, f"decref on free block {block}"
        self.ref_counts[block] = count - 1
        if count == 1:
            self._free.append(block)
