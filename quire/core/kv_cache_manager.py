"""Block tables: which physical blocks hold each sequence's K/V, grown on demand."""

from __future__ import annotations

from quire.core.block_pool import BlockHash, BlockPool, hash_block
from quire.core.kv_allocator import KVUsage, LiveSequences


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each sequence to its list of physical blocks (the engine's ``KVAllocator``, "paged").

    Token ``i`` of a sequence lives in slot ``i % block_size`` of block ``table[i // block_size]``.
    Blocks are allocated only when a step is about to write into them, so memory is wasted
    only in each sequence's last block. Forked sequences share blocks; a shared block is copied
    (copy-on-write) before a sequence writes into it.

    With prefix caching, every full block a sequence computes is registered in the pool's hash
    table (``cache_blocks``), and a new sequence starts from the longest run of cached full
    blocks of its tokens (``allocate_cached_prefix``). Cached blocks are immutable: a write
    into one copies it first, exactly like a write into a shared block.

    A second pool of ``num_host_blocks`` lives in host memory. ``swap_out`` moves a group of
    sequences' tables there and ``swap_in`` brings them back, one host block per distinct device
    block, so blocks the group's sequences share stay shared on both sides. The caller (the
    cache engine) performs the returned (src, dst) copies.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, num_host_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.host_pool = BlockPool(num_host_blocks, enable_caching=False) if num_host_blocks else None
        self.host_tables: dict[int, list[int]] = {}
        self.block_tables: dict[int, list[int]] = {}
        # Per sequence: the hashes of its leading full blocks, as far as they have been registered.
        self._hashes: dict[int, list[BlockHash]] = {}

    @property
    def enable_prefix_caching(self) -> bool:
        return self.pool.enable_caching

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def expect(self, seq_id: int, num_prompt_tokens: int, max_tokens: int) -> None:
        """Nothing to prepare: blocks are allocated only when a step writes into them."""

    def usage(self, live: LiveSequences, next_request: tuple[int, int] | None) -> KVUsage:
        """Slots of the sequences' blocks split by progress; never external fragmentation (any free block fits).

        Blocks shared by several sequences are counted once per sequence, so this is meant for
        unshared workloads (the memory benchmark); ``next_request`` does not matter here.
        """
        tokens = reserved = internal = 0
        for seq_id, table in self.block_tables.items():
            slots = len(table) * self.block_size
            done, final = live.get(seq_id, (0, 0))
            will_fill = min(max(final, done), slots)
            tokens += done
            reserved += max(0, will_fill - done)
            internal += slots - max(will_fill, done)
        return KVUsage(self.pool.num_blocks * self.block_size, tokens, reserved, internal, 0)

    def num_blocks_needed(self, seq_id: int, start: int, num_new_tokens: int) -> int:
        """Blocks a write of tokens [start, start + num_new_tokens) would take from the pool."""
        return self._blocks_for_write(self.block_tables.get(seq_id, []), start, num_new_tokens, self._writable)

    def _blocks_for_write(self, table: list[int], start: int, num_new_tokens: int, writable) -> int:
        """New blocks past the end of ``table``, plus a copy of each non-``writable`` block the write lands in."""
        end = start + num_new_tokens
        new_blocks = max(0, cdiv(end, self.block_size) - len(table))
        first, last = start // self.block_size, min(cdiv(end, self.block_size), len(table))
        shared = sum(1 for b in table[first:last] if not writable(b))
        return new_blocks + shared

    def _writable(self, block: int) -> bool:
        return self.pool.ref_counts[block] == 1 and self.pool.block_hashes[block] is None

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
            if not self._writable(block):
                new_block = self.pool.allocate()
                copies.append((block, new_block))
                self.pool.decref(block)
                table[i] = new_block
        while len(table) < cdiv(end, self.block_size):
            table.append(self.pool.allocate())
        return copies

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens (the slots of rejected draft tokens).

        Those blocks were allocated by the step that wrote the drafts, so they are the
        sequence's own (no other table, no hash): each goes straight back to the free queue.
        """
        table = self.block_tables.get(seq_id)
        keep = cdiv(num_tokens, self.block_size)
        if not table or len(table) <= keep:
            return
        for block in reversed(table[keep:]):
            self.pool.decref(block)
        del table[keep:]
        hashes = self._hashes.get(seq_id)
        if hashes is not None and len(hashes) > keep:
            del hashes[keep:]

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """Give the child the parent's blocks, shared (reference counts go up)."""
        assert child_seq_id not in self.block_tables, f"sequence {child_seq_id} already has blocks"
        table = list(self.block_tables.get(parent_seq_id, []))
        for block in table:
            self.pool.incref(block)
        self.block_tables[child_seq_id] = table
        if parent_seq_id in self._hashes:
            self._hashes[child_seq_id] = list(self._hashes[parent_seq_id])

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks in both pools."""
        # Release in reverse: the tail of a sequence is the least shared part, so with the LRU
        # free queue its cached blocks are evicted before the prefix blocks others may reuse.
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.pool.decref(block)
        self._hashes.pop(seq_id, None)
        for block in self.host_tables.pop(seq_id, []):
            self.host_pool.decref(block)

    # -- swapping -----------------------------------------------------------------------

    @property
    def num_host_blocks(self) -> int:
        return self.host_pool.num_blocks if self.host_pool else 0

    @property
    def num_free_host_blocks(self) -> int:
        return self.host_pool.num_free if self.host_pool else 0

    def num_distinct_blocks(self, seq_ids: list[int], host: bool = False) -> int:
        """Distinct blocks held by these sequences (on the device, or on the host)."""
        tables = self.host_tables if host else self.block_tables
        return len({b for sid in seq_ids for b in tables.get(sid, [])})

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return self.host_pool is not None and self.num_distinct_blocks(seq_ids) <= self.host_pool.num_free

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Move these sequences' tables to the host pool; returns (device, host) block copies.

        The device blocks are released (a block other sequences also hold stays with them).
        Prefix-cache hashes are forgotten: the sequences re-register their blocks after swap-in.
        """
        assert self.can_swap_out(seq_ids), "the caller checks can_swap_out first"
        return self._move(seq_ids, self.block_tables, self.pool, self.host_tables, self.host_pool)

    def num_blocks_needed_to_swap_in(self, seq_ids: list[int], writes: list[tuple[int, int, int]]) -> int:
        """Device blocks ``swap_in(seq_ids)`` takes, plus those the ``writes`` (seq_id, start, n) then need."""
        needed = self.num_distinct_blocks(seq_ids, host=True)
        # Swapped-in blocks are fresh (no hash): only those the group's sequences share need a copy.
        refs = self.host_pool.ref_counts
        for seq_id, start, num in writes:
            needed += self._blocks_for_write(self.host_tables.get(seq_id, []), start, num, lambda b: refs[b] == 1)
        return needed

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Bring these sequences' tables back from the host pool; returns (host, device) block copies."""
        needed = self.num_distinct_blocks(seq_ids, host=True)
        if needed > self.pool.num_free:
            raise RuntimeError(f"need {needed} blocks to swap in, {self.pool.num_free} free")
        return self._move(seq_ids, self.host_tables, self.host_pool, self.block_tables, self.pool)

    def _move(self, seq_ids, src_tables, src_pool, dst_tables, dst_pool) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}  # src block -> dst block, so shared blocks stay shared
        for seq_id in seq_ids:
            assert seq_id not in dst_tables, f"sequence {seq_id} already has blocks on the other side"
            src_table = src_tables.pop(seq_id, [])
            dst_table = []
            for block in src_table:
                dst = mapping.get(block)
                if dst is None:
                    dst = mapping[block] = dst_pool.allocate()
                else:
                    dst_pool.incref(dst)
                dst_table.append(dst)
            for block in reversed(src_table):
                src_pool.decref(block)
            dst_tables[seq_id] = dst_table
            self._hashes.pop(seq_id, None)
        return list(mapping.items())

    # -- prefix cache -------------------------------------------------------------------

    def find_cached_prefix(self, token_ids: list[int], salt: str | None = None) -> tuple[list[int], list[BlockHash]]:
        """The longest run of cached full blocks that starts ``token_ids``, and their hashes.

        At most ``len(token_ids) - 1`` tokens are matched, so at least one token is always
        computed (its logits are needed to sample). Changes nothing.
        """
        if not self.pool.enable_caching:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, tokens, salt if i == 0 else None)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def allocate_cached_prefix(self, seq_id: int, token_ids: list[int], salt: str | None = None) -> int:
        """Start ``seq_id``'s table with the cached blocks of its longest cached prefix.

        Returns the number of tokens whose K/V are thereby already computed (a multiple of the
        block size). Reviving a free cached block takes it out of the free queue.
        """
        assert not self.block_tables.get(seq_id), f"sequence {seq_id} already has blocks"
        blocks, hashes = self.find_cached_prefix(token_ids, salt)
        if not blocks:
            return 0
        for block in blocks:
            self.pool.touch(block)
        self.block_tables[seq_id] = blocks
        self._hashes[seq_id] = hashes
        return len(blocks) * self.block_size

    def cache_blocks(
        self, seq_id: int, token_ids: list[int], num_computed_tokens: int, salt: str | None = None
    ) -> None:
        """Register the full blocks among ``seq_id``'s first ``num_computed_tokens`` tokens in the hash table.

        The scheduler calls it when it schedules the step that computes them (with the count
        those tokens will reach): each layer writes all of a step's K/V before any sequence
        attends, so another request scheduled in the same step can already share them, and
        nothing runs between scheduling and executing a step that could free them.
        """
        if not self.pool.enable_caching:
            return
        bs = self.block_size
        hashes = self._hashes.setdefault(seq_id, [])
        table = self.block_tables.get(seq_id, [])
        for i in range(len(hashes), min(num_computed_tokens // bs, len(table))):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            block_hash = hash_block(hashes[-1] if hashes else None, tokens, salt if i == 0 else None)
            hashes.append(block_hash)
            self.pool.cache_block(table[i], block_hash, tokens)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_cache()
        self._hashes.clear()

    def stats(self) -> dict[str, int]:
        """Pool sizes, occupancy and prefix-cache contents (a part of ``LLMEngine.stats``)."""
        return {
            "num_kv_blocks": self.pool.num_blocks,
            "num_free_kv_blocks": self.pool.num_free,
            "peak_used_kv_blocks": self.pool.peak_used,
            "block_size": self.block_size,
            "num_host_blocks": self.num_host_blocks,
            "num_free_host_blocks": self.num_free_host_blocks,
            "num_cached_kv_blocks": len(self.pool.cached),
        }
