"""KV allocators for the memory benchmark: Quire's paged one and the paper's contiguous baselines.

The paper compares PagedAttention with systems that keep each request's K/V in one contiguous
chunk reserved when the request is admitted (Orca, FasterTransformer). Those reservations are
modelled here as thin adapters with the methods ``Scheduler`` calls on its ``kv_cache``, so the
*same* scheduler (and, in real runs, the same engine and KV tensor) serves one trace under
every allocator:

* ``ContiguousAllocator`` places a reservation of ``reserve_tokens(prompt, output)`` tokens in
  a modelled contiguous address space (``AddressSpace``, first fit) at the sequence's first
  write, and frees it when the sequence finishes. Its policies are Orca (Max): the maximum
  model length; Orca (Pow2): the prompt plus the next power of two of the true output length;
  Orca (Oracle): prompt plus exactly the true output length.
* ``StaticBatchAllocator`` is FasterTransformer-like static batching: Max reservations, but a
  finished member keeps its reservation until its whole batch has finished.
* ``PagedAllocator`` is Quire's ``KVCacheManager`` plus the bookkeeping for the accounting.

An address-space unit is ``unit`` tokens: 1 (token-granular, like the paper's baselines) in
simulations; the engine's block size in real runs, where a reservation is a run of
consecutive physical blocks of the real KV tensor, so the block table the model reads is
``base, base + 1, ...``.

Every allocator is told each sequence's true lengths (``expect``) before its first step: Pow2
and Oracle need them to size reservations, and the accounting (``snapshot``) needs them to tell
slots that will still be filled (reservation) from slots that never will (internal
fragmentation).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from quire.core.kv_cache_manager import KVCacheManager, cdiv

__all__ = [
    "AddressSpace",
    "ContiguousAllocator",
    "MemorySnapshot",
    "PagedAllocator",
    "Policy",
    "StaticBatchAllocator",
    "reserve_tokens",
]


class Policy(enum.Enum):
    MAX = "max"
    POW2 = "pow2"
    ORACLE = "oracle"


def reserve_tokens(policy: Policy, prompt_len: int, output_len: int, max_model_len: int) -> int:
    """Token slots a contiguous allocator reserves for a request at admission."""
    if policy is Policy.MAX:
        return max_model_len
    if policy is Policy.POW2:
        return min(max_model_len, prompt_len + (1 << max(0, output_len - 1).bit_length()))
    return min(max_model_len, prompt_len + output_len)


@dataclass(frozen=True)
class MemorySnapshot:
    """Where every KV token slot is at one moment (all fields in token slots).

    ``token_states``: slots holding a running sequence's computed K/V. ``reserved``: allocated
    slots its future tokens will fill. ``internal_frag``: allocated slots it will never fill.
    ``external_frag``: free slots in holes too small for the next waiting request's reservation
    (zero when nothing waits). ``free``: the rest.
    """

    capacity: int
    token_states: int = 0
    reserved: int = 0
    internal_frag: int = 0
    external_frag: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.token_states - self.reserved - self.internal_frag - self.external_frag


@dataclass
class _Seq:
    prompt_len: int
    output_len: int
    base: int | None = None  # first unit of the reservation, once placed
    units: int = 0
    written: int = 0  # tokens [0, written) have slots
    table: list[int] = field(default_factory=list)  # base, base + 1, ... covering the written tokens

    @property
    def final_len(self) -> int:
        """Tokens whose K/V are ever written: the last sampled token is never fed back."""
        return self.prompt_len + self.output_len - 1


class AddressSpace:
    """A contiguous range of ``size`` units with first-fit placement; free holes kept merged and sorted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0] if size else []
        self._lengths: list[int] = [size] if size else []

    @property
    def holes(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._lengths, strict=True))

    @property
    def num_free(self) -> int:
        return sum(self._lengths)

    def fits(self, units: int) -> bool:
        return any(length >= units for length in self._lengths)

    def place(self, units: int) -> int | None:
        """Start of the lowest hole that holds ``units``, now taken; None when no hole is big enough."""
        for i, length in enumerate(self._lengths):
            if length >= units:
                start = self._starts[i]
                if length == units:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += units
                    self._lengths[i] -= units
                return start
        return None

    def release(self, start: int, units: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._lengths.insert(i, units)
        if i + 1 < len(self._starts) and start + units == self._starts[i + 1]:  # merge with the next hole
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # and with the previous one
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)

    def free_units_below(self, units: int) -> int:
        """Free units in holes smaller than ``units``: memory a request of that size cannot use."""
        return sum(length for length in self._lengths if length < units)


class ContiguousAllocator:
    """Orca-style: one contiguous reservation per sequence, placed first-fit at its first write.

    The scheduler admits a request only when ``num_blocks_needed`` <= ``num_free_blocks``; this
    adapter answers 0 when a hole can take the reservation and more than all free units when
    none can, so admission is "does the reservation fit", and a running sequence never needs
    anything more (no preemption, as in Orca).
    """

    enable_prefix_caching = False

    def __init__(self, num_units: int, unit: int, policy: Policy, max_model_len: int) -> None:
        if cdiv(max_model_len, unit) > num_units:
            raise ValueError(f"max_model_len {max_model_len} does not fit in {num_units * unit} slots")
        self.unit = unit
        self.block_size = unit  # what callers that size block tables read
        self.policy = policy
        self.max_model_len = max_model_len
        self.space = AddressSpace(num_units)
        # True lengths of every sequence announced (kept after free: the scheduler also frees a
        # request it could not admit, which is then admitted later); and the placed ones.
        self._seqs: dict[int, _Seq] = {}
        self._placed: dict[int, _Seq] = {}

    @property
    def capacity(self) -> int:
        return self.space.size * self.unit

    def expect(self, seq_id: int, prompt_len: int, output_len: int) -> None:
        """Record a sequence's true lengths before it is scheduled."""
        self._seqs[seq_id] = _Seq(prompt_len, output_len)

    def reservation_units(self, prompt_len: int, output_len: int) -> int:
        return cdiv(reserve_tokens(self.policy, prompt_len, output_len, self.max_model_len), self.unit)

    # -- the scheduler's interface ------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.space.num_free

    def num_blocks_needed(self, seq_id: int, start: int, num_new_tokens: int) -> int:
        seq = self._seqs[seq_id]
        if seq.base is not None:
            return 0 if start + num_new_tokens <= seq.units * self.unit else self.space.num_free + 1
        return 0 if self.space.fits(self.reservation_units(seq.prompt_len, seq.output_len)) else self.space.num_free + 1

    def allocate_slots(self, seq_id: int, start: int, num_new_tokens: int) -> list[tuple[int, int]]:
        seq = self._seqs[seq_id]
        if seq.base is None:
            units = self.reservation_units(seq.prompt_len, seq.output_len)
            base = self.space.place(units)
            if base is None:
                raise RuntimeError(f"no hole of {units} units: the caller must check num_blocks_needed first")
            seq.base, seq.units = base, units
            self._placed[seq_id] = seq
        end = start + num_new_tokens
        if end > seq.units * self.unit:
            raise RuntimeError(f"sequence {seq_id} writes past its reservation ({end} > {seq.units * self.unit})")
        if end > seq.written:
            seq.written = end
            table = seq.table
            table.extend(range(seq.base + len(table), seq.base + cdiv(end, self.unit)))
        return []

    def block_table(self, seq_id: int) -> list[int]:
        """The units written so far (like ``KVCacheManager``, the live list, grown in place)."""
        seq = self._placed.get(seq_id)
        return seq.table if seq is not None else []

    def free(self, seq_id: int) -> None:
        seq = self._placed.pop(seq_id, None)
        if seq is not None:
            assert seq.base is not None
            self.space.release(seq.base, seq.units)
            seq.base, seq.units, seq.written, seq.table = None, 0, 0, []

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        raise NotImplementedError("contiguous reservations cannot be shared (no parallel sampling or beam search)")

    def can_swap_out(self, *args: object) -> bool:
        """Never preempted in Orca; if asked (swap-capable schedulers), the answer is recompute."""
        return False

    def cache_blocks(self, *args: object, **kwargs: object) -> None:
        """No prefix cache."""

    def allocate_cached_prefix(self, *args: object, **kwargs: object) -> int:
        return 0

    # -- accounting ----------------------------------------------------------------------

    def snapshot(self, computed: dict[int, int], next_request: tuple[int, int] | None) -> MemorySnapshot:
        """The slot breakdown, given each live sequence's computed tokens and the next waiting request's lengths."""
        tokens = reserved = internal = 0
        for seq_id, seq in self._placed.items():
            slots = seq.units * self.unit
            done = computed.get(seq_id)
            if done is None:  # finished but still held (static batching): nothing in it is of use any more
                internal += slots
                continue
            will_fill = min(seq.final_len, slots)
            tokens += done
            reserved += max(0, will_fill - done)
            internal += slots - max(will_fill, done)
        external = 0
        if next_request is not None:
            external = self.space.free_units_below(self.reservation_units(*next_request)) * self.unit
        return MemorySnapshot(self.capacity, tokens, reserved, internal, external)


class StaticBatchAllocator(ContiguousAllocator):
    """FasterTransformer-like: Max reservations, held until every member of the batch has finished.

    The driver forms the batches (it releases a new batch of requests only when the previous
    one is done); this allocator only defers ``free`` so the memory of early finishers stays
    reserved, as in a static batch buffer.
    """

    def __init__(self, num_units: int, unit: int, max_model_len: int) -> None:
        super().__init__(num_units, unit, Policy.MAX, max_model_len)
        self._finished: set[int] = set()

    @property
    def batch_size(self) -> int:
        """Requests per batch: as many max-length buffers as the KV budget holds."""
        return self.space.size // self.reservation_units(1, 1)

    def held_lengths(self) -> list[int]:
        """Context lengths of finished members still in the batch (they keep computing padding)."""
        return [self._placed[s].written for s in self._finished]

    def free(self, seq_id: int) -> None:
        if seq_id not in self._placed:
            return
        self._finished.add(seq_id)
        if self._finished >= self._placed.keys():
            for done in list(self._finished):
                super().free(done)
            self._finished.clear()


class PagedAllocator(KVCacheManager):
    """Quire's own ``KVCacheManager`` (prefix caching off), plus true lengths for the accounting."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self._final: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        return self.pool.num_blocks * self.block_size

    def expect(self, seq_id: int, prompt_len: int, output_len: int) -> None:
        """Record a sequence's true lengths (kept for the run: a preempted sequence comes back)."""
        self._final[seq_id] = prompt_len + output_len - 1

    def snapshot(self, computed: dict[int, int], next_request: tuple[int, int] | None) -> MemorySnapshot:
        tokens = reserved = internal = 0
        for seq_id, table in self.block_tables.items():
            slots = len(table) * self.block_size
            done = computed.get(seq_id, 0)
            will_fill = min(self._final.get(seq_id, done), slots)
            tokens += done
            reserved += max(0, will_fill - done)
            internal += slots - max(will_fill, done)
        return MemorySnapshot(self.capacity, tokens, reserved, internal, 0)
