"""Contiguous-reservation KV allocators: the paper's baselines (Orca Max / Pow2 / Oracle, static batching).

Systems before PagedAttention kept each request's K/V in one contiguous chunk reserved when the
request is admitted, sized for the longest output it might produce. These classes implement
``KVAllocator`` with that policy, so the same scheduler and engine serve a trace under every
allocator and the memory each wastes can be measured (``quire bench memory``):

* ``ReservationAllocator`` places a reservation of ``reserve_tokens(policy, prompt, max_tokens)``
  tokens first-fit in an ``AddressSpace`` of blocks at the sequence's first write and frees it
  when the sequence finishes. Orca (Max): the maximum model length; Orca (Pow2): the prompt plus
  the next power of two of the output length; Orca (Oracle): the prompt plus exactly the output
  length. The output length is the request's ``max_tokens``, which is the true length for the
  ``ignore_eos`` traces the benchmark serves (the oracle's knowledge).
* ``StaticBatchAllocator`` is FasterTransformer-like static batching: Max reservations, but a
  finished member keeps its reservation until its whole batch has finished.

A block here is ``block_size`` consecutive token slots (1 in the paper-scale simulation, the
engine's block size in real runs, where a reservation is a run of consecutive physical blocks
of the KV tensor, so the block table is ``base, base + 1, ...``).

What these policies do not have, they say through the protocol: no prefix cache
(``enable_prefix_caching`` False, no hits, nothing registered), no host pool (``can_swap_out``
False, so preemption is always by recompute), no sharing (the engine refuses ``n > 1`` and beam
search with them). They are benchmark baselines: they keep every announced sequence's lengths
for their lifetime (a recomputed sequence is admitted again without being announced again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from quire.core.address_space import AddressSpace
from quire.core.kv_allocator import BlockCopies, KVUsage, LiveSequences
from quire.core.kv_cache_manager import cdiv

__all__ = ["Policy", "ReservationAllocator", "StaticBatchAllocator", "reserve_tokens", "static_batch_size"]


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


def static_batch_size(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """Requests per static batch: as many max-length buffers as ``num_blocks`` blocks hold."""
    return num_blocks // cdiv(max_model_len, block_size)


@dataclass
class _Seq:
    prompt_len: int
    output_len: int
    base: int | None = None  # first block of the reservation, once placed
    units: int = 0
    written: int = 0  # tokens [0, written) have slots
    table: list[int] = field(default_factory=list)  # base, base + 1, ... covering the written tokens


class ReservationAllocator:
    """Orca-style: one contiguous reservation per sequence, placed first-fit at its first write.

    Admission is "does the reservation fit": ``num_blocks_needed`` answers 0 when a hole can take
    it and more than all free blocks when none can; a placed sequence never needs more (it
    cannot outgrow its reservation), so running requests are never preempted, as in Orca.
    """

    def __init__(self, num_blocks: int, block_size: int, policy: Policy, max_model_len: int) -> None:
        if cdiv(max_model_len, block_size) > num_blocks:
            raise ValueError(f"max_model_len {max_model_len} does not fit in {num_blocks * block_size} slots")
        self._block_size = block_size
        self.policy = policy
        self.max_model_len = max_model_len
        self.space = AddressSpace(num_blocks)
        # Lengths of every announced sequence (kept after free: the scheduler also frees a request
        # it could not admit or preempted by recompute, which is admitted later); and the placed ones.
        self._seqs: dict[int, _Seq] = {}
        self._placed: dict[int, _Seq] = {}

    @property
    def capacity(self) -> int:
        """Token slots in the whole space."""
        return self.space.size * self._block_size

    def reservation_blocks(self, prompt_len: int, output_len: int) -> int:
        return cdiv(reserve_tokens(self.policy, prompt_len, output_len, self.max_model_len), self._block_size)

    # -- KVAllocator ----------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        """Always False: a reservation belongs to one sequence, nothing is shared."""
        return False

    @property
    def num_free_blocks(self) -> int:
        return self.space.num_free

    def stats(self) -> dict[str, int]:
        """One pool, no host pool and no prefix cache; the peak is not tracked, so it is the current use."""
        used = self.space.size - self.space.num_free
        return {
            "num_kv_blocks": self.space.size,
            "num_free_kv_blocks": self.space.num_free,
            "peak_used_kv_blocks": used,
            "block_size": self._block_size,
            "num_host_blocks": 0,
            "num_free_host_blocks": 0,
            "num_cached_kv_blocks": 0,
        }

    def expect(self, seq_id: int, num_prompt_tokens: int, max_tokens: int) -> None:
        """Record the lengths the reservation is sized from."""
        self._seqs[seq_id] = _Seq(num_prompt_tokens, max_tokens)

    def block_table(self, seq_id: int) -> list[int]:
        """The blocks written so far (like ``KVCacheManager``, the live list, grown in place)."""
        seq = self._placed.get(seq_id)
        return seq.table if seq is not None else []

    def num_blocks_needed(self, seq_id: int, start: int, num_new_tokens: int) -> int:
        """0 when the write fits (in a hole for a new reservation, or inside the placed one); else more than is free."""
        seq = self._seqs[seq_id]
        if seq.base is not None:
            return 0 if start + num_new_tokens <= seq.units * self._block_size else self.space.num_free + 1
        fits = self.space.fits(self.reservation_blocks(seq.prompt_len, seq.output_len))
        return 0 if fits else self.space.num_free + 1

    def allocate_slots(self, seq_id: int, start: int, num_new_tokens: int) -> BlockCopies:
        """Place the reservation at the first write; extend the table over it. Never copies."""
        seq = self._seqs[seq_id]
        if seq.base is None:
            units = self.reservation_blocks(seq.prompt_len, seq.output_len)
            base = self.space.place(units)
            if base is None:
                raise RuntimeError(f"no hole of {units} blocks: the caller must check num_blocks_needed first")
            seq.base, seq.units = base, units
            self._placed[seq_id] = seq
        end = start + num_new_tokens
        if end > seq.units * self._block_size:
            limit = seq.units * self._block_size
            raise RuntimeError(f"sequence {seq_id} writes past its reservation ({end} > {limit})")
        if end > seq.written:
            seq.written = end
            table = seq.table
            table.extend(range(seq.base + len(table), seq.base + cdiv(end, self._block_size)))
        return []

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Nothing to give back: the reservation covers the sequence's whole length up front."""

    def free(self, seq_id: int) -> None:
        """Give the reservation back to the address space (merged with neighbouring holes)."""
        seq = self._placed.pop(seq_id, None)
        if seq is not None:
            assert seq.base is not None
            self.space.release(seq.base, seq.units)
            seq.base, seq.units, seq.written, seq.table = None, 0, 0, []

    def allocate_cached_prefix(self, seq_id: int, token_ids: list[int], salt: str | None = None) -> int:
        """0: there is no prefix cache (the scheduler does not ask, since ``enable_prefix_caching`` is False)."""
        return 0

    def cache_blocks(
        self, seq_id: int, token_ids: list[int], num_computed_tokens: int, salt: str | None = None
    ) -> None:
        """Registers nothing: without a prefix cache no block is ever looked up."""

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        """False: there is no host pool, so a preempted request is always recomputed."""
        return False

    def swap_out(self, seq_ids: list[int]) -> BlockCopies:
        """Never valid, since ``can_swap_out`` is always False."""
        raise RuntimeError("a reservation allocator has no host pool: the caller checks can_swap_out first")

    def num_blocks_needed_to_swap_in(self, seq_ids: list[int], writes: list[tuple[int, int, int]]) -> int:
        """Nothing is ever on the host, so only the writes count."""
        return sum(self.num_blocks_needed(seq_id, start, n) for seq_id, start, n in writes)

    def swap_in(self, seq_ids: list[int]) -> BlockCopies:
        """Nothing is ever on the host: no copies."""
        return []

    def usage(self, live: LiveSequences, next_request: tuple[int, int] | None) -> KVUsage:
        """Reservations split by the live sequences' progress; holes too small for ``next_request`` are external."""
        tokens = reserved = internal = 0
        for seq_id, seq in self._placed.items():
            slots = seq.units * self._block_size
            state = live.get(seq_id)
            if state is None:  # finished but still held (static batching): nothing in it is of use any more
                internal += slots
                continue
            done, final = state
            will_fill = min(final, slots)
            tokens += done
            reserved += max(0, will_fill - done)
            internal += slots - max(will_fill, done)
        external = 0
        if next_request is not None:
            external = self.space.free_units_below(self.reservation_blocks(*next_request)) * self._block_size
        return KVUsage(self.capacity, tokens, reserved, internal, external)


class StaticBatchAllocator(ReservationAllocator):
    """FasterTransformer-like: Max reservations, held until every member of the batch has finished.

    Whoever submits requests forms the batches (it releases ``static_batch_size`` requests only
    when the previous batch is done); this allocator only defers ``free`` so the memory of early
    finishers stays reserved, as in a static batch buffer.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int) -> None:
        super().__init__(num_blocks, block_size, Policy.MAX, max_model_len)
        self._finished: set[int] = set()

    @property
    def batch_size(self) -> int:
        """Requests per batch: as many max-length buffers as the KV budget holds."""
        return static_batch_size(self.space.size, self.block_size, self.max_model_len)

    def held_lengths(self) -> list[int]:
        """Context lengths of finished members still in the batch (they keep computing padding)."""
        return [self._placed[s].written for s in self._finished]

    def free(self, seq_id: int) -> None:
        """Mark the member finished; release every reservation of the batch once all members are."""
        if seq_id not in self._placed:
            return
        self._finished.add(seq_id)
        if self._finished >= self._placed.keys():
            for done in list(self._finished):
                super().free(done)
            self._finished.clear()
