"""Block tables: which physical blocks hold each sequence's K/V, grown on demand."""

from __future__ import annotations

from quire.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each sequence to its list of physical blocks.

    Token ``i`` of a sequence lives in slot ``i % block_size`` of block ``table[i // block_size]``.
    Blocks are allocated only when a step is about to write into them, so memory is wasted
    only in each sequence's last block. Forked sequences share blocks; a shared block is copied
    (copy-on-write) before a sequence writes into it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def num_blocks_needed(self, seq_id: int, start: int, num_new_tokens: int) -> int:
        """Blocks a write of tokens [start, start + num_new_tokens) would take from the pool."""
        table = self.block_tables.get(seq_id, [])
        end = start + num_new_tokens
        new_blocks = max(0, cdiv(end, self.block_size) - len(table))
        first, last = start // self.block_size, min(cdiv(end, self.block_size), len(table))
        shared = sum(1 for b in table[first:last] if self.pool.ref_counts[b] > 1)
        return new_blocks + shared

    def allocate_slots(self, seq_id: int, start: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make tokens [start, start + num_new_tokens) writable; returns (src, dst) block copies.

        The caller checks ``num_blocks_needed`` against ``num_free_blocks`` first, so this never
        fails half-way.
        """
        needed = self.num_blocks_needed(seq_id, start, num_new_tokens)
        if needed > self.pool.num_free:
            raise RuntimeError(f"need {needed} blocks, {self.pool.num_free} free")
        table = self.block_tables.setdefault(seq_id, [])
        end = start + num_new_tokens
        copies: list[tuple[int, int]] = []
        for i in range(start // self.block_size, min(cdiv(end, self.block_size), len(table))):
            block = table[i]
            if self.pool.ref_counts[block] > 1:
                new_block = self.pool.allocate()
                copies.append((block, new_block))
                self.pool.decref(block)
                table[i] = new_block
        while len(table) < cdiv(end, self.block_size):
            table.append(self.pool.allocate())
        return copies

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """Give the child the parent's blocks, shared (reference counts go up)."""
        assert child_seq_id not in self.block_tables, f"sequence {child_seq_id} already has blocks"
        table = list(self.block_tables.get(parent_seq_id, []))
        for block in table:
            self.pool.incref(block)
        self.block_tables[child_seq_id] = table

    def free(self, seq_id: int) -> None:
        # Release in reverse so the tail blocks (least likely shared) return to the pool first.
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.pool.decref(block)
