"""The pool of physical KV blocks: free list, reference counts and the prefix-cache hash table."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

# A full block's identity: a digest chained from its parent block's digest and its own token ids.
BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], extra: str | None = None) -> BlockHash:
    """SHA-256 over the parent's digest, the block's token ids and optional extra keys (a cache salt).

    Chaining makes a block's hash stand for the whole prefix up to and including it.
    """
    h = hashlib.sha256(parent or b"\0")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\0extra\0" + extra.encode())
    return h.digest()


class BlockPool:
    """Hands out block ids, counts how many block tables point at each, and caches full blocks.

    A block whose last reference is dropped goes back to the free queue. With prefix caching,
    a full block can carry a hash (``cache_block``); it then keeps its hash and contents while
    free and can be revived by ``touch`` until ``allocate`` reuses it for something else.

    The free queue is one ``OrderedDict`` used as an O(1) LRU: ``allocate`` takes from the
    front; freed blocks without a hash go to the front (nothing to lose, reused first), freed
    cached blocks to the back (evicted least-recently-freed first); ``touch`` removes a block
    from the middle in O(1). No operation scans a list.

    Blocks with more than one reference are shared (forked sequences, cached prefixes) and must
    be copied before they are written; so must blocks with a hash (their contents are what the
    hash table promises).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash -> the block holding it (in use or free)
        self.peak_used = 0
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: never referenced, or free but still cached (evictable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV block pool exhausted: the caller must check num_free first.")
        block, _ = self._free.popitem(last=False)
        assert self.ref_counts[block] == 0, f"free block {block} still referenced"
        if self.block_hashes[block] is not None:
            self._uncache(block)
            self.num_evictions += 1
        self.ref_counts[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"incref on free block {block}"
        self.ref_counts[block] += 1

    def touch(self, block: int) -> None:
        """Take a reference to a cached block, reviving it from the free queue if it was free."""
        if self.ref_counts[block] == 0:
            assert self.block_hashes[block] is not None, f"touch on free uncached block {block}"
            del self._free[block]
        self.ref_counts[block] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def decref(self, block: int) -> None:
        count = self.ref_counts[block]
        assert count > 0, f"decref on free block {block}"
        self.ref_counts[block] = count - 1
        if count == 1:
            self._free[block] = None
            if self.block_hashes[block] is None:
                self._free.move_to_end(block, last=False)

    # -- prefix cache -------------------------------------------------------------------

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> int | None:
        """The block caching ``block_hash``, if its stored token ids are ``token_ids`` too."""
        block = self.cached.get(block_hash)
        if block is None or self._block_tokens[block] != token_ids:
            return None
        return block

    def cache_block(self, block: int, block_hash: BlockHash, token_ids: tuple[int, ...]) -> bool:
        """Record that ``block`` (in use, full) holds ``token_ids`` after the prefix ``block_hash`` stands for.

        A no-op when caching is off, when the block already has a hash, or when another block
        already caches this hash (the first one stays canonical). Returns whether it was cached.
        """
        if not self.enable_caching or self.block_hashes[block] is not None or block_hash in self.cached:
            return False
        assert self.ref_counts[block] > 0, f"caching free block {block}"
        self.cached[block_hash] = block
        self.block_hashes[block] = block_hash
        self._block_tokens[block] = token_ids
        return True

    def reset_cache(self) -> None:
        """Forget every cached hash; in-use blocks stay where they are, free ones become plain free."""
        for block in self.cached.values():
            self.block_hashes[block] = None
            self._block_tokens[block] = None
            if self.ref_counts[block] == 0:
                self._free.move_to_end(block, last=False)
        self.cached.clear()

    def _uncache(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        assert block_hash is not None and self.cached.get(block_hash) == block
        del self.cached[block_hash]
        self.block_hashes[block] = None
        self._block_tokens[block] = None
