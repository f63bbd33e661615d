"""The KV allocators (paged and the reservation baselines) and their accounting, on traces small enough to
work out by hand, plus the protocol they share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.bench.datasets import TraceRequest
from quire.bench.step_model import StepSample, StepTimeModel, fit
from quire.bench.trace_runner import SimulatedExecutor, run_trace
from quire.config import KV_ALLOCATORS, SchedulerConfig
from quire.core.address_space import AddressSpace
from quire.core.allocator_registry import build_kv_allocator
from quire.core.kv_allocator import KVAllocator
from quire.core.kv_allocator import KVUsage as MemorySnapshot
from quire.core.kv_cache_manager import KVCacheManager, cdiv
from quire.core.reservation_allocator import (
    Policy,
    ReservationAllocator,
    StaticBatchAllocator,
    reserve_tokens,
    static_batch_size,
)

ContiguousAllocator = ReservationAllocator


def PagedAllocator(num_blocks: int, block_size: int) -> KVCacheManager:  # noqa: N802 - reads like the others
    return KVCacheManager(num_blocks, block_size)


def test_reservation_sizes():
    assert reserve_tokens(Policy.MAX, 10, 3, 2048) == 2048
    assert reserve_tokens(Policy.POW2, 10, 25, 2048) == 10 + 32  # the paper's example: 25 -> 32
    assert reserve_tokens(Policy.POW2, 10, 32, 2048) == 10 + 32
    assert reserve_tokens(Policy.POW2, 10, 1, 2048) == 10 + 1
    assert reserve_tokens(Policy.POW2, 2000, 100, 2048) == 2048  # capped at max_model_len
    assert reserve_tokens(Policy.ORACLE, 10, 25, 2048) == 35


def test_address_space_first_fit_and_merging():
    space = AddressSpace(10)
    assert space.place(3) == 0
    assert space.place(4) == 3
    assert space.place(2) == 7
    assert space.holes == [(9, 1)]
    space.release(0, 3)
    assert space.holes == [(0, 3), (9, 1)]
    assert space.place(4) is None  # 4 free units, but no hole of 4: external fragmentation
    assert space.free_units_below(4) == 4
    assert space.place(1) == 0  # first fit: the lowest hole that holds it
    space.release(3, 4)
    assert space.holes == [(1, 6), (9, 1)]  # merged with the hole before it
    space.release(7, 2)
    assert space.holes == [(1, 9)]  # and with both neighbours
    space.release(0, 1)
    assert space.holes == [(0, 10)] and space.num_free == 10


def test_contiguous_accounting_by_hand():
    """Oracle over 10 token slots: A (prompt 2, output 3) reserves 5, B (1, 2) reserves 3."""
    alloc = ContiguousAllocator(10, 1, Policy.ORACLE, max_model_len=8)
    alloc.expect(0, 2, 3)
    alloc.expect(1, 1, 2)
    assert alloc.num_blocks_needed(0, 0, 2) == 0  # fits
    assert alloc.allocate_slots(0, 0, 2) == []
    alloc.allocate_slots(1, 0, 1)
    assert alloc.block_table(0) == [0, 1] and alloc.block_table(1) == [5]
    assert alloc.space.holes == [(8, 2)]

    # A: 2 computed, will fill 4 of 5 (the last sampled token is never written): 2 reserved, 1 internal.
    # B: 1 computed, will fill 2 of 3: 1 reserved, 1 internal. The next request needs 4: the 2-slot hole is external.
    snap = alloc.usage({0: (2, 4), 1: (1, 2)}, next_request=(2, 2))
    assert snap == MemorySnapshot(capacity=10, token_states=3, reserved=3, internal_frag=2, external_frag=2)
    assert snap.free == 0
    assert alloc.usage({0: (2, 4), 1: (1, 2)}, next_request=None).external_frag == 0  # nothing waits: just free

    # A request that does not fit is refused through the scheduler's interface.
    alloc.expect(2, 2, 2)
    assert alloc.num_blocks_needed(2, 0, 2) > alloc.num_free_blocks

    alloc.free(0)  # holes [0, 5) and [8, 10): a 4-slot request fits in the first
    snap = alloc.usage({1: (1, 2)}, next_request=(2, 2))
    assert (snap.token_states, snap.reserved, snap.internal_frag, snap.external_frag, snap.free) == (1, 1, 1, 2, 5)
    alloc.free(1)
    assert alloc.space.holes == [(0, 10)]


def test_contiguous_units_are_blocks_of_the_real_cache():
    """With a unit of 4 tokens a reservation is a run of consecutive block ids."""
    alloc = ContiguousAllocator(8, 4, Policy.POW2, max_model_len=32)
    alloc.expect(7, 5, 6)  # 5 + 8 = 13 tokens -> 4 blocks
    alloc.allocate_slots(7, 0, 5)
    assert alloc.block_table(7) == [0, 1]
    alloc.allocate_slots(7, 5, 4)
    assert alloc.block_table(7) == [0, 1, 2]
    with pytest.raises(RuntimeError):
        alloc.allocate_slots(7, 9, 8)  # past the reservation
    assert not alloc.can_swap_out([7])  # no host pool: preemption is by recompute
    with pytest.raises(RuntimeError):
        alloc.swap_out([7])
    assert alloc.swap_in([7]) == [] and not alloc.enable_prefix_caching
    assert alloc.allocate_cached_prefix(8, [1, 2, 3, 4, 5]) == 0


def test_max_reservation_limits_concurrency():
    alloc = ContiguousAllocator(20, 1, Policy.MAX, max_model_len=8)
    for seq_id in range(3):
        alloc.expect(seq_id, 1, 1)
    alloc.allocate_slots(0, 0, 1)
    alloc.allocate_slots(1, 0, 1)
    assert alloc.num_blocks_needed(2, 0, 1) > alloc.num_free_blocks  # 4 free slots, 8 needed
    snap = alloc.usage({0: (1, 1), 1: (1, 1)}, next_request=(1, 1))
    assert (snap.token_states, snap.reserved, snap.internal_frag, snap.external_frag) == (2, 0, 14, 4)


def test_static_batch_holds_memory_until_the_batch_ends():
    alloc = StaticBatchAllocator(16, 1, max_model_len=8)
    assert alloc.batch_size == 2
    alloc.expect(0, 2, 2)
    alloc.expect(1, 2, 4)
    alloc.allocate_slots(0, 0, 3)
    alloc.allocate_slots(1, 0, 3)
    alloc.free(0)  # finished first: still held, all of it useless now
    assert alloc.num_free_blocks == 0
    assert alloc.held_lengths() == [3]
    snap = alloc.usage({1: (3, 5)}, next_request=None)
    assert (snap.token_states, snap.reserved, snap.internal_frag) == (3, 2, 8 + 3)
    alloc.free(1)
    assert alloc.num_free_blocks == 16 and alloc.held_lengths() == []


def test_paged_accounting_by_hand():
    alloc = PagedAllocator(num_blocks=4, block_size=2)
    alloc.expect(0, 3, 3)  # writes 5 tokens in all
    alloc.expect(1, 1, 1)  # writes 1
    alloc.allocate_slots(0, 0, 3)  # 2 blocks
    alloc.allocate_slots(1, 0, 1)  # 1 block
    snap = alloc.usage({0: (3, 5), 1: (1, 1)}, next_request=(5, 5))
    assert snap == MemorySnapshot(capacity=8, token_states=4, reserved=1, internal_frag=1, external_frag=0)
    assert snap.free == 2


def test_trace_through_the_scheduler_by_hand():
    """Two requests, paged blocks of 4 over 8 slots, every step 1 s (worked out in the comments)."""
    trace = [TraceRequest((1, 2, 3, 4), 3, 0.0), TraceRequest((5, 6), 2, 2.5)]
    alloc = PagedAllocator(num_blocks=2, block_size=4)
    executor = SimulatedExecutor(alloc, SchedulerConfig(8, 64, 16), StepTimeModel("unit", 1.0, 0.0, 0.0))
    result = run_trace("paged", trace, executor)
    # step 1 (t=0): A prefills 4 -> 4 tokens in 1 block, 4 slots free
    # step 2 (t=1): A decodes -> 5 tokens, 2 blocks; it will write 6: 1 reserved, 2 internal
    # step 3 (t=2): A's last token; A finishes and frees: 8 free (B arrives at 2.5)
    # step 4 (t=3): B prefills 2 -> 1 block; it will write 3: 1 reserved, 1 internal, 4 free; B was the
    #               last to be admitted, so the window ends; step 5 (B's last token) is outside it.
    shares = result.shares
    assert shares.token_states == pytest.approx(11 / 32)
    assert shares.reserved == pytest.approx(2 / 32)
    assert shares.internal_frag == pytest.approx(3 / 32)
    assert shares.external_frag == 0
    assert shares.free == pytest.approx(16 / 32)
    assert result.mean_batched_requests == pytest.approx(1.0)
    assert result.num_steps == 5 and result.duration_s == pytest.approx(5.0)
    assert result.window_s == pytest.approx(4.0)
    assert result.mean_normalized_latency == pytest.approx(((3 - 0) / 3 + (5 - 2.5) / 2) / 2)
    assert result.request_throughput == pytest.approx(2 / 5)


@pytest.mark.parametrize("kind", ["paged", "max", "pow2", "oracle", "static"])
def test_every_allocator_serves_a_trace_to_completion(kind):
    trace = [TraceRequest(tuple(range(1, 2 + i % 7)), 1 + (i * 5) % 9, 0.0) for i in range(24)]
    slots, max_len = 64, 16
    alloc = {
        "paged": lambda: PagedAllocator(slots // 4, 4),
        "max": lambda: ContiguousAllocator(slots, 1, Policy.MAX, max_len),
        "pow2": lambda: ContiguousAllocator(slots, 1, Policy.POW2, max_len),
        "oracle": lambda: ContiguousAllocator(slots, 1, Policy.ORACLE, max_len),
        "static": lambda: StaticBatchAllocator(slots, 1, max_len),
    }[kind]()
    executor = SimulatedExecutor(alloc, SchedulerConfig(32, 32, max_len), StepTimeModel("t", 0.01, 0.001, 0.0))
    static = alloc.batch_size if isinstance(alloc, StaticBatchAllocator) else None
    result = run_trace(kind, trace, executor, static_batch=static)
    s = result.shares
    assert s.token_states + s.reserved + s.internal_frag + s.external_frag + s.free == pytest.approx(1.0)
    assert result.output_throughput * result.duration_s == pytest.approx(sum(r.output_len for r in trace))
    if kind in ("max", "static"):
        assert result.mean_batched_requests <= slots // max_len
    if kind == "paged":
        assert s.external_frag == 0


def test_step_model_fit_recovers_coefficients():
    truth = StepTimeModel("truth", 0.02, 1e-4, 3e-6)
    samples = [StepSample(t, c, truth.seconds(t, c)) for t in (1, 8, 64, 300) for c in (10, 500, 4000)]
    fitted = fit(samples)
    assert fitted.c0 == pytest.approx(0.02)
    assert fitted.c_token == pytest.approx(1e-4)
    assert fitted.c_context == pytest.approx(3e-6)


@pytest.mark.parametrize("name", KV_ALLOCATORS)
def test_every_configured_allocator_satisfies_the_protocol(name):
    allocator = build_kv_allocator(name, num_blocks=16, block_size=4, max_model_len=32)
    assert isinstance(allocator, KVAllocator)
    assert allocator.block_size == 4 and allocator.num_free_blocks == 16
    # Every member of the protocol is there (isinstance checks only the methods).
    members = [m for m in vars(KVAllocator) if not m.startswith("_")]
    assert members and all(hasattr(allocator, m) for m in members)


def test_static_batch_size_is_the_number_of_max_buffers():
    assert static_batch_size(16, 1, 8) == 2
    assert static_batch_size(128, 16, 256) == 8
    assert StaticBatchAllocator(16, 1, max_model_len=8).batch_size == 2


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(list(Policy)),
    block_size=st.sampled_from([1, 2, 4]),
    requests=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=12),
    data=st.data(),
)
def test_reservation_block_accounting(policy, block_size, requests, data):
    """Free blocks + placed reservations == all blocks; tables stay inside reservations; freeing restores the space."""
    max_len, num_blocks = 24, 40
    alloc = ReservationAllocator(num_blocks, block_size, policy, max_len)
    placed: dict[int, int] = {}  # seq -> blocks reserved
    for seq_id, (prompt, output) in enumerate(requests):
        alloc.expect(seq_id, prompt, output)
        need = alloc.num_blocks_needed(seq_id, 0, prompt)
        units = cdiv(reserve_tokens(policy, prompt, output, max_len), block_size)
        if need > alloc.num_free_blocks:
            assert not alloc.space.fits(units)
            continue
        assert need == 0
        alloc.allocate_slots(seq_id, 0, prompt)
        placed[seq_id] = units
        table = alloc.block_table(seq_id)
        assert table == list(range(table[0], table[0] + cdiv(prompt, block_size)))
        assert alloc.num_free_blocks + sum(placed.values()) == num_blocks
        if data.draw(st.booleans()):
            alloc.free(seq_id)
            del placed[seq_id]
            assert alloc.block_table(seq_id) == []
    live = {s: (requests[s][0], requests[s][0] + requests[s][1] - 1) for s in placed}
    usage = alloc.usage(live, next_request=None)
    assert usage.free >= 0 and usage.capacity == num_blocks * block_size
    for seq_id in list(placed):
        alloc.free(seq_id)
    assert alloc.space.holes == [(0, num_blocks)]
