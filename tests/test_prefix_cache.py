"""Prefix caching in the block pool and the KV cache manager (pure Python, no model).

A hypothesis state machine drives random mixes of new sequences (which reuse cached prefixes),
appends, forks, frees and evictions, simulating the physical contents of every block, and
checks that ref counts, the free queue and the hash table stay consistent and that a cached
block always holds exactly the tokens its hash stands for.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from quire.core.block_pool import BlockPool, hash_block
from quire.core.kv_cache_manager import KVCacheManager, cdiv


def check_consistent(kv: KVCacheManager) -> None:
    pool = kv.pool
    refs = Counter(b for table in kv.block_tables.values() for b in table)
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == refs[block], block
    free = list(pool._free)
    assert len(set(free)) == len(free)
    assert set(free) == {b for b in range(pool.num_blocks) if refs[b] == 0}
    assert pool.num_free == len(free) == kv.num_free_blocks
    # The hash table and the per-block hashes describe the same mapping.
    assert {h: b for b, h in enumerate(pool.block_hashes) if h is not None} == pool.cached
    # Free blocks without a hash come before every free cached block (they are reused first).
    kinds = [pool.block_hashes[b] is not None for b in free]
    assert kinds == sorted(kinds), "an uncached free block sits behind a cached one"


# -- unit tests ------------------------------------------------------------------------------


def test_free_queue_reuses_uncached_blocks_first_and_evicts_cached_ones_lru():
    pool = BlockPool(4, enable_caching=True)
    a, b, c, d = (pool.allocate() for _ in range(4))
    pool.cache_block(a, b"ha", (1,))
    pool.cache_block(b, b"hb", (2,))
    for block in (a, b, c, d):
        pool.decref(block)
    # c and d (no hash) first, then the cached ones, least recently freed first.
    assert list(pool._free) == [d, c, a, b]
    assert pool.lookup(b"ha", (1,)) == a
    assert [pool.allocate(), pool.allocate()] == [d, c]
    assert pool.cached == {b"ha": a, b"hb": b}, "handing out uncached blocks must not evict"
    assert pool.allocate() == a
    assert pool.lookup(b"ha", (1,)) is None and pool.num_evictions == 1
    assert pool.lookup(b"hb", (2,)) == b


def test_touch_revives_a_free_cached_block_in_o1():
    pool = BlockPool(3, enable_caching=True)
    a = pool.allocate()
    pool.cache_block(a, b"h", (7,))
    pool.decref(a)
    assert pool.num_free == 3
    pool.touch(a)
    assert pool.ref_counts[a] == 1 and a not in pool._free and pool.num_free == 2
    pool.touch(a)
    assert pool.ref_counts[a] == 2
    pool.decref(a)
    pool.decref(a)
    assert list(pool._free)[-1] == a, "a freed cached block goes to the back (most recently used)"


def test_a_hash_collision_never_returns_the_wrong_tokens():
    pool = BlockPool(2, enable_caching=True)
    a = pool.allocate()
    pool.cache_block(a, b"same-hash", (1, 2, 3))
    assert pool.lookup(b"same-hash", (1, 2, 3)) == a
    assert pool.lookup(b"same-hash", (1, 2, 4)) is None


def test_hash_chains_parent_tokens_and_salt():
    h1 = hash_block(None, (1, 2))
    assert hash_block(None, (1, 2)) == h1
    assert hash_block(None, (1, 3)) != h1
    assert hash_block(h1, (1, 2)) != h1
    assert hash_block(None, (1, 2), "salt") != h1


def test_cached_prefix_is_capped_so_one_token_is_computed():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    tokens = list(range(8))  # exactly two full blocks
    kv.allocate_slots(0, 0, 8)
    kv.cache_blocks(0, tokens, 8)
    first, second = kv.block_table(0)
    blocks, _ = kv.find_cached_prefix(tokens)
    assert blocks == [first], "the whole prompt is cached, but its last token must be computed"
    blocks, _ = kv.find_cached_prefix([*tokens, 99])
    assert blocks == [first, second]
    blocks, _ = kv.find_cached_prefix([0, 1, 2, 9, 4, 5, 6, 7, 8])
    assert blocks == []
    assert kv.find_cached_prefix(tokens, salt="other")[0] == []


def test_a_new_sequence_shares_the_cached_prefix_and_computes_the_rest():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10))
    kv.allocate_slots(0, 0, 10)
    kv.cache_blocks(0, prompt, 10)
    kv.free(0)
    assert kv.num_free_blocks == 10, "freed cached blocks stay evictable"
    assert len(kv.pool.cached) == 2
    num = kv.allocate_cached_prefix(1, [*prompt[:8], 50, 51])
    assert num == 8
    assert kv.num_free_blocks == 8
    assert kv.num_blocks_needed(1, 8, 2) == 1
    assert kv.allocate_slots(1, 8, 2) == []
    check_consistent(kv)


def test_writing_into_a_cached_block_copies_it_first():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    kv.allocate_slots(0, 0, 4)
    kv.cache_blocks(0, [1, 2, 3, 4], 4)
    (a,) = kv.block_table(0)
    assert kv.num_blocks_needed(0, 2, 1) == 1
    ((src, dst),) = kv.allocate_slots(0, 2, 1)
    assert src == a and kv.block_table(0) == [dst]
    assert kv.pool.lookup(kv.pool.block_hashes[a], (1, 2, 3, 4)) == a, "the cached original is untouched"
    check_consistent(kv)


def test_reset_prefix_cache_forgets_every_hash():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    kv.allocate_slots(0, 0, 6)
    kv.cache_blocks(0, [1, 2, 3, 4, 5, 6], 6)
    kv.free(0)
    kv.allocate_slots(1, 0, 2)
    kv.cache_blocks(1, [9, 9], 2)
    kv.reset_prefix_cache()
    assert kv.pool.cached == {} and all(h is None for h in kv.pool.block_hashes)
    assert kv.find_cached_prefix([1, 2, 3, 4, 5, 6, 7])[0] == []
    check_consistent(kv)


def test_caching_off_never_hashes():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate_slots(0, 0, 4)
    kv.cache_blocks(0, [1, 2, 3, 4], 4)
    assert kv.pool.cached == {}
    assert kv.allocate_cached_prefix(1, [1, 2, 3, 4, 5]) == 0


# -- the state machine ------------------------------------------------------------------------


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random new (prefix-reusing) / append / fork / free / evict, against simulated block contents."""

    @initialize(num_blocks=st.integers(2, 16), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
        self.bs = block_size
        self.tokens: dict[int, list[int]] = {}  # every live sequence's tokens, all computed
        self.physical: dict[int, list[int | None]] = {b: [None] * block_size for b in range(num_blocks)}
        self.next_id = 0

    def _write(self, seq_id: int, start: int, new: list[int]) -> bool:
        kv = self.kv
        if kv.num_blocks_needed(seq_id, start, len(new)) > kv.num_free_blocks:
            return False
        for src, dst in kv.allocate_slots(seq_id, start, len(new)):
            self.physical[dst] = list(self.physical[src])
        table = kv.block_table(seq_id)
        for pos, token in enumerate(new, start):
            assert kv.pool.ref_counts[table[pos // self.bs]] == 1, "writing into a shared block"
            assert kv.pool.block_hashes[table[pos // self.bs]] is None, "writing into a cached block"
            self.physical[table[pos // self.bs]][pos % self.bs] = token
        self.tokens[seq_id] = self.tokens[seq_id][:start] + new
        kv.cache_blocks(seq_id, self.tokens[seq_id], len(self.tokens[seq_id]))
        return True

    # Small alphabets and shared stems so that prefixes repeat and hits happen.
    @rule(
        stem=st.sampled_from([[], [1, 2], [1, 2, 3, 4], [5, 6, 7, 8, 9, 1]]),
        rest=st.lists(st.integers(0, 3), max_size=8),
    )
    def new_sequence(self, stem: list[int], rest: list[int]) -> None:
        prompt = stem + rest
        if not prompt:
            return
        seq_id = self.next_id
        self.next_id += 1
        self.tokens[seq_id] = []
        hit = self.kv.allocate_cached_prefix(seq_id, prompt)
        assert hit % self.bs == 0 and hit <= len(prompt) - 1
        self.tokens[seq_id] = prompt[:hit]
        if not self._write(seq_id, hit, prompt[hit:]):
            self.kv.free(seq_id)
            del self.tokens[seq_id]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def append(self, data, new: list[int]) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self._write(seq_id, len(self.tokens[seq_id]), new)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.next_id
        self.next_id += 1
        self.kv.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq_id)
        del self.tokens[seq_id]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def preempt_and_readmit(self, data) -> None:
        """Recompute preemption: free the sequence, then admit it again, reusing what is still cached."""
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens.pop(seq_id)
        self.kv.free(seq_id)
        if tokens:
            self.tokens[seq_id] = []
            hit = self.kv.allocate_cached_prefix(seq_id, tokens)
            self.tokens[seq_id] = tokens[:hit]
            if not self._write(seq_id, hit, tokens[hit:]):
                self.kv.free(seq_id)
                del self.tokens[seq_id]

    @rule(count=st.integers(1, 3))
    def evict(self, count: int) -> None:
        """Take free blocks for an unrelated sequence (evicting cached ones), then give them back."""
        seq_id = self.next_id
        self.next_id += 1
        count = min(count, self.kv.num_free_blocks)
        if count:
            self.tokens[seq_id] = []
            self._write(seq_id, 0, [100 + i for i in range(count * self.bs)])
            self.kv.free(seq_id)
            del self.tokens[seq_id]

    @rule()
    def reset(self) -> None:
        self.kv.reset_prefix_cache()

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        if hasattr(self, "kv"):
            check_consistent(self.kv)

    @invariant()
    def sequences_read_back_their_tokens(self) -> None:
        for seq_id, tokens in self.tokens.items():
            table = self.kv.block_table(seq_id)
            assert len(table) == cdiv(len(tokens), self.bs)
            seen = [self.physical[table[p // self.bs]][p % self.bs] for p in range(len(tokens))]
            assert seen == tokens, f"sequence {seq_id} reads K/V that are not its own"

    @invariant()
    def cached_blocks_hold_what_their_hash_promises(self) -> None:
        if not hasattr(self, "kv"):
            return
        pool = self.kv.pool
        for block in pool.cached.values():
            assert tuple(self.physical[block]) == pool._block_tokens[block]


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
