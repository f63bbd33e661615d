"""KVCacheManager / BlockPool: reference counting, copy-on-write and block-table invariants.

A hypothesis state machine drives random interleavings of growth, forks, overwrites of shared
blocks, preemption and frees. Besides the bookkeeping invariants it simulates the *contents* of
the physical blocks (writes land in ``table[pos // block_size]``, copies returned by
``allocate_slots`` are applied the way the engine applies them), so a missing or wrong
copy-on-write shows up as one sequence seeing another's writes.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from quire.core.block_pool import BlockPool
from quire.core.kv_cache_manager import KVCacheManager, cdiv


def check_pool_consistent(kv: KVCacheManager) -> None:
    """The bookkeeping invariants, checked against the block tables themselves."""
    pool = kv.pool
    refs = Counter(b for table in kv.block_tables.values() for b in table)
    for seq_id, table in kv.block_tables.items():
        assert len(set(table)) == len(table), f"seq {seq_id} holds a block twice: {table}"
        assert all(0 <= b < pool.num_blocks for b in table), table
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == refs[block], (
            f"block {block}: ref count {pool.ref_counts[block]}, in {refs[block]} tables"
        )
    free = list(pool._free)
    assert len(set(free)) == len(free), f"free list has duplicates: {free}"
    assert not set(free) & set(refs), f"blocks both free and referenced: {set(free) & set(refs)}"
    assert len(free) + len(refs) == pool.num_blocks
    assert pool.num_free == len(free) == kv.num_free_blocks
    assert pool.num_used == len(refs)


# -- plain unit tests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [
        (1, 16, 1),
        (15, 16, 1),
        (16, 16, 1),
        (17, 16, 2),
        (32, 16, 2),
        (33, 16, 3),
        (1000, 16, 63),
        (1024, 16, 64),
        (7, 1, 7),
        (7, 4, 2),
        (8, 4, 2),
        (9, 4, 3),
        (100, 32, 4),
    ],
)
def test_block_count_for_token_count(num_tokens, block_size, expected):
    kv = KVCacheManager(num_blocks=100, block_size=block_size)
    assert kv.num_blocks_needed(0, 0, num_tokens) == expected
    assert kv.allocate_slots(0, 0, num_tokens) == []
    assert len(kv.block_table(0)) == expected
    assert kv.num_free_blocks == 100 - expected
    # Writing the same range again needs nothing more.
    assert kv.num_blocks_needed(0, 0, num_tokens) == 0
    assert kv.allocate_slots(0, 0, num_tokens) == []
    assert len(kv.block_table(0)) == expected
    check_pool_consistent(kv)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_growing_one_token_at_a_time_appends_blocks_only_at_boundaries(block_size):
    kv = KVCacheManager(num_blocks=64, block_size=block_size)
    previous: list[int] = []
    for pos in range(40):
        needed = kv.num_blocks_needed(0, pos, 1)
        assert needed == (1 if pos % block_size == 0 else 0), pos
        assert kv.allocate_slots(0, pos, 1) == []
        table = kv.block_table(0)
        assert len(table) == cdiv(pos + 1, block_size)
        assert table[: len(previous)] == previous, "existing blocks must not move"
        previous = list(table)
    check_pool_consistent(kv)


def test_zero_new_tokens_need_no_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.num_blocks_needed(0, 0, 0) == 0
    kv.allocate_slots(0, 0, 5)
    assert kv.num_blocks_needed(0, 5, 0) == 0


def test_fork_shares_blocks_and_bumps_ref_counts():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(0, 0, 6)
    parent = list(kv.block_table(0))
    kv.fork(0, 1)
    assert kv.block_table(1) == parent
    assert kv.block_table(1) is not kv.block_table(0), "the child needs its own table list"
    assert [kv.pool.ref_counts[b] for b in parent] == [2, 2]
    assert kv.num_free_blocks == 6, "fork must not allocate"
    check_pool_consistent(kv)


def test_copy_on_write_of_the_shared_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(0, 0, 6)  # blocks [a, b]; b holds 2 of 4 slots
    a, b = kv.block_table(0)
    kv.fork(0, 1)

    # The child appends token 6, which lands in the shared block b: it must get a private copy.
    assert kv.num_blocks_needed(1, 6, 1) == 1
    copies = kv.allocate_slots(1, 6, 1)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == b
    assert dst not in (a, b)
    assert kv.block_table(1) == [a, dst]
    assert kv.block_table(0) == [a, b], "the parent's table must not change"
    assert kv.pool.ref_counts[a] == 2
    assert kv.pool.ref_counts[b] == 1
    assert kv.pool.ref_counts[dst] == 1
    assert kv.num_free_blocks == 5

    # b is now private to the parent: appending there needs no copy and no block.
    assert kv.num_blocks_needed(0, 6, 1) == 0
    assert kv.allocate_slots(0, 6, 1) == []
    assert kv.block_table(0) == [a, b]
    check_pool_consistent(kv)


def test_growing_past_a_full_shared_block_does_not_copy_it():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(0, 0, 8)  # two full blocks
    a, b = kv.block_table(0)
    kv.fork(0, 1)
    assert kv.num_blocks_needed(1, 8, 1) == 1
    assert kv.allocate_slots(1, 8, 1) == []
    table = kv.block_table(1)
    assert table[:2] == [a, b] and len(table) == 3
    assert kv.pool.ref_counts[a] == kv.pool.ref_counts[b] == 2
    check_pool_consistent(kv)


def test_overwrite_spanning_two_shared_blocks_and_growing_copies_both_in_order():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(0, 0, 10)  # [a, b, c]
    a, b, c = kv.block_table(0)
    kv.fork(0, 1)
    # Tokens [6, 13): touches b (shared), c (shared) and one new block.
    assert kv.num_blocks_needed(1, 6, 7) == 3
    copies = kv.allocate_slots(1, 6, 7)
    assert [src for src, _ in copies] == [b, c]
    table = kv.block_table(1)
    assert len(table) == 4
    assert table[0] == a
    assert table[1:3] == [dst for _, dst in copies]
    assert len(set(table) | {a, b, c}) == 6
    assert kv.num_free_blocks == 8 - 6
    check_pool_consistent(kv)


def test_copy_on_write_with_three_sharers_keeps_the_original_for_the_other_two():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(0, 0, 3)
    (a,) = kv.block_table(0)
    kv.fork(0, 1)
    kv.fork(0, 2)
    assert kv.pool.ref_counts[a] == 3
    ((src, dst),) = kv.allocate_slots(2, 3, 1)
    assert src == a
    assert kv.pool.ref_counts[a] == 2
    assert kv.block_table(0) == kv.block_table(1) == [a]
    assert kv.block_table(2) == [dst]
    check_pool_consistent(kv)


def test_free_returns_blocks_only_when_the_last_reference_goes():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    kv.allocate_slots(0, 0, 4)
    kv.fork(0, 1)
    kv.allocate_slots(1, 4, 2)  # child: 2 shared + 1 private
    assert kv.num_free_blocks == 3
    kv.free(0)
    assert kv.num_free_blocks == 3, "the shared blocks are still held by the child"
    check_pool_consistent(kv)
    kv.free(1)
    assert kv.num_free_blocks == 6
    assert kv.block_tables == {}
    assert kv.pool.ref_counts == [0] * 6
    kv.free(1)  # freeing an unknown sequence is a no-op
    assert kv.num_free_blocks == 6
    check_pool_consistent(kv)


def test_allocation_beyond_the_pool_raises_and_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.num_blocks_needed(0, 0, 9) == 3
    with pytest.raises(RuntimeError):
        kv.allocate_slots(0, 0, 9)
    assert kv.num_free_blocks == 2
    assert kv.block_table(0) == []
    kv.allocate_slots(0, 0, 8)
    assert kv.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        kv.allocate_slots(0, 8, 1)
    with pytest.raises(RuntimeError):
        kv.allocate_slots(1, 0, 1)
    assert len(kv.block_table(0)) == 2
    check_pool_consistent(kv)


def test_copy_on_write_with_no_free_block_raises_and_keeps_sharing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.allocate_slots(0, 0, 6)
    kv.fork(0, 1)
    before = (list(kv.block_table(0)), list(kv.block_table(1)), list(kv.pool.ref_counts))
    assert kv.num_blocks_needed(1, 6, 1) == 1
    with pytest.raises(RuntimeError):
        kv.allocate_slots(1, 6, 1)
    assert (kv.block_table(0), kv.block_table(1), kv.pool.ref_counts) == before
    check_pool_consistent(kv)


def test_block_pool_exhaustion_and_validation():
    pool = BlockPool(2)
    got = {pool.allocate(), pool.allocate()}
    assert got == {0, 1}
    assert pool.num_free == 0 and pool.num_used == 2 and pool.peak_used == 2
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate()
    pool.incref(0)
    pool.decref(0)
    assert pool.num_free == 0
    pool.decref(0)
    assert pool.num_free == 1
    assert pool.allocate() == 0
    with pytest.raises(ValueError):
        BlockPool(0)


# -- the state machine ----------------------------------------------------------------------


class KVCacheMachine(RuleBasedStateMachine):
    """Random grow / overwrite / fork / preempt / free against a model of each sequence."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 8, 16]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # The model: every live sequence's token values, in order (len == tokens written).
        self.expected: dict[int, list[int]] = {}
        # What the (simulated) KV cache holds: physical block -> slot values.
        self.physical: dict[int, list[int | None]] = {b: [None] * block_size for b in range(num_blocks)}
        self.next_seq_id = 0
        self.next_value = 0

    # -- helpers ------------------------------------------------------------------------

    def _snapshot(self):
        return (
            {s: list(t) for s, t in self.kv.block_tables.items()},
            list(self.kv.pool.ref_counts),
            sorted(self.kv.pool._free),
        )

    def _write(self, seq_id: int, start: int, num_new: int) -> None:
        """allocate_slots + the engine's side: apply copies, then write fresh values."""
        kv, bs = self.kv, self.block_size
        end = start + num_new
        before = self._snapshot()
        table_before = list(kv.block_table(seq_id))
        free_before = set(kv.pool._free)
        needed = kv.num_blocks_needed(seq_id, start, num_new)

        if needed > kv.num_free_blocks:
            with pytest.raises(RuntimeError):
                kv.allocate_slots(seq_id, start, num_new)
            assert self._snapshot() == before, "a refused allocation must not change anything"
            return

        shared_in_range = [
            (i, table_before[i])
            for i in range(start // bs, min(cdiv(end, bs), len(table_before)))
            if kv.pool.ref_counts[table_before[i]] > 1
        ]
        copies = kv.allocate_slots(seq_id, start, num_new)
        table = kv.block_table(seq_id)

        assert kv.num_free_blocks == len(free_before) - needed
        assert len(table) == max(len(table_before), cdiv(end, bs))
        assert [src for src, _ in copies] == [b for _, b in shared_in_range]
        dsts = [dst for _, dst in copies]
        assert len(set(dsts)) == len(dsts)
        for (i, src), (_, dst) in zip(shared_in_range, copies, strict=True):
            assert dst in free_before, "a copy must go to a block that was free"
            assert table[i] == dst, "the writer must now own the copy"
            assert kv.pool.ref_counts[dst] == 1
            assert kv.pool.ref_counts[src] == before[1][src] - 1
        copied = {i for i, _ in shared_in_range}
        for i, block in enumerate(table_before):
            if i not in copied:
                assert table[i] == block, "blocks that were not copied must not move"
        for block in table[len(table_before) :]:
            assert block in free_before, "new blocks must come from the free list"
        # Everything the writer is about to write into is now private to it.
        for i in range(start // bs, cdiv(end, bs)):
            assert kv.pool.ref_counts[table[i]] == 1

        # The engine copies K/V block by block before running the model, then writes.
        for src, dst in copies:
            self.physical[dst] = list(self.physical[src])
        values = self.expected[seq_id]
        for pos in range(start, end):
            value = self.next_value
            self.next_value += 1
            self.physical[table[pos // bs]][pos % bs] = value
            if pos < len(values):
                values[pos] = value
            else:
                assert pos == len(values)
                values.append(value)

    # -- rules --------------------------------------------------------------------------

    @rule(num_new=st.integers(1, 40))
    def new_sequence(self, num_new: int) -> None:
        seq_id = self.next_seq_id
        self.next_seq_id += 1
        self.expected[seq_id] = []
        self._write(seq_id, 0, num_new)
        if not self.expected[seq_id]:  # refused: the sequence never started
            del self.expected[seq_id]
            assert seq_id not in self.kv.block_tables

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), num_new=st.integers(1, 20))
    def grow(self, data, num_new: int) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.expected)), label="seq")
        self._write(seq_id, len(self.expected[seq_id]), num_new)

    @precondition(lambda self: any(self.expected.values()))
    @rule(data=st.data())
    def overwrite(self, data) -> None:
        """Rewrite a range that starts inside the sequence (possibly running past its end)."""
        seq_id = data.draw(st.sampled_from(sorted(s for s, v in self.expected.items() if v)), label="seq")
        length = len(self.expected[seq_id])
        start = data.draw(st.integers(0, length - 1), label="start")
        num_new = data.draw(st.integers(1, length - start + 2 * self.block_size), label="num_new")
        self._write(seq_id, start, num_new)

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.expected)), label="parent")
        child = self.next_seq_id
        self.next_seq_id += 1
        free_before = self.kv.num_free_blocks
        refs_before = list(self.kv.pool.ref_counts)
        self.kv.fork(parent, child)
        assert self.kv.block_table(child) == self.kv.block_table(parent)
        assert self.kv.num_free_blocks == free_before
        for block in self.kv.block_table(parent):
            assert self.kv.pool.ref_counts[block] == refs_before[block] + 1
        self.expected[child] = list(self.expected[parent])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def preempt(self, data) -> None:
        """Recompute preemption: drop all of the sequence's blocks; it restarts from token 0."""
        seq_id = data.draw(st.sampled_from(sorted(self.expected)), label="seq")
        owned_alone = [b for b in self.kv.block_table(seq_id) if self.kv.pool.ref_counts[b] == 1]
        free_before = self.kv.num_free_blocks
        self.kv.free(seq_id)
        assert seq_id not in self.kv.block_tables
        assert self.kv.num_free_blocks == free_before + len(owned_alone)
        assert set(owned_alone) <= set(self.kv.pool._free)
        self.expected[seq_id] = []

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.expected)), label="seq")
        self.kv.free(seq_id)
        assert seq_id not in self.kv.block_tables
        del self.expected[seq_id]

    @rule()
    def free_everything(self) -> None:
        for seq_id in list(self.expected):
            self.kv.free(seq_id)
        self.expected.clear()
        assert self.kv.num_free_blocks == self.num_blocks
        assert self.kv.pool.ref_counts == [0] * self.num_blocks
        assert self.kv.block_tables == {}

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        check_pool_consistent(self.kv)
        assert set(self.kv.block_tables) <= set(self.expected)

    @invariant()
    def tables_have_exactly_the_blocks_their_tokens_need(self) -> None:
        for seq_id, values in self.expected.items():
            assert len(self.kv.block_table(seq_id)) == cdiv(len(values), self.block_size), seq_id

    @invariant()
    def every_sequence_reads_back_what_it_wrote(self) -> None:
        bs = self.block_size
        for seq_id, values in self.expected.items():
            table = self.kv.block_table(seq_id)
            seen = [self.physical[table[pos // bs]][pos % bs] for pos in range(len(values))]
            assert seen == values, f"sequence {seq_id} sees another sequence's writes"

    def teardown(self) -> None:
        kv = getattr(self, "kv", None)
        if kv is None:
            return
        for seq_id in list(self.expected):
            kv.free(seq_id)
        assert kv.num_free_blocks == self.num_blocks
        assert kv.pool.ref_counts == [0] * self.num_blocks


KVCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheMachine = KVCacheMachine.TestCase
