"""The KV allocator interface: what the ``Scheduler`` asks of whatever hands out KV slots.

The scheduler never sees how slots are laid out. It asks how many blocks a write needs,
whether that many are free, and then allocates; everything else (paging, contiguous
reservations, swapping, prefix caching) is a property of the allocator behind this protocol.
``KVCacheManager`` (paged, the engine's default) and the reservation policies in
``quire.core.reservation_allocator`` (Orca Max / Pow2 / Oracle, static batching) implement it;
``CacheConfig.kv_allocator`` picks one by name (``quire.core.allocator_registry``).

A *block* is the allocator's unit of ``block_size`` token slots: a page for the paged manager,
a slice of a reservation for the contiguous ones. Block ids index the engine's KV tensor, so
the table an allocator returns is what the model reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["BlockCopies", "KVAllocator", "KVUsage", "LiveSequences"]

BlockCopies = list[tuple[int, int]]
"""(source block, destination block) pairs the cache engine must copy before the step runs."""

LiveSequences = dict[int, tuple[int, int]]
"""seq_id -> (tokens computed so far, tokens whose K/V it will ever write) for every running sequence."""


@dataclass(frozen=True)
class KVUsage:
    """Where every KV token slot is at one moment (all fields in token slots).

    ``token_states``: slots holding a running sequence's computed K/V. ``reserved``: allocated
    slots its future tokens will fill. ``internal_frag``: allocated slots it will never fill.
    ``external_frag``: free slots in holes too small for the next waiting request's reservation
    (zero when nothing waits, and always zero for a paged allocator). ``free``: the rest.
    """

    capacity: int
    token_states: int = 0
    reserved: int = 0
    internal_frag: int = 0
    external_frag: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.token_states - self.reserved - self.internal_frag - self.external_frag


@runtime_checkable
class KVAllocator(Protocol):
    """The KV-slot manager the ``Scheduler`` drives: exactly the calls it makes, nothing else.

    Contract: the scheduler checks ``num_blocks_needed`` (or ``num_blocks_needed_to_swap_in``)
    against ``num_free_blocks`` before ``allocate_slots`` (or ``swap_in``), and
    ``can_swap_out`` before ``swap_out``; an allocator may raise when a caller skips the check.
    """

    @property
    def block_size(self) -> int:
        """Token slots per block; ``token i`` of a sequence lives in block ``table[i // block_size]``."""
        ...

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether ``allocate_cached_prefix`` can ever return a hit (the scheduler skips the lookup if not)."""
        ...

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to ``allocate_slots`` and ``swap_in`` right now."""
        ...

    def expect(self, seq_id: int, num_prompt_tokens: int, max_tokens: int) -> None:
        """Announce a sequence when its request arrives, before it is first scheduled.

        Args:
            seq_id: The sequence's id.
            num_prompt_tokens: Its prompt length.
            max_tokens: The most tokens it may generate (the request's ``max_tokens``, or what
                ``max_model_len`` leaves after the prompt). Policies that reserve memory up
                front size the reservation from it; on-demand allocators need no notice.
        """
        ...

    def block_table(self, seq_id: int) -> list[int]:
        """The blocks holding ``seq_id``'s written tokens, in order (empty if it holds none).

        Returns:
            The block ids the model reads this sequence's K/V through.
        """
        ...

    def num_blocks_needed(self, seq_id: int, start: int, num_new_tokens: int) -> int:
        """Blocks that writing tokens ``[start, start + num_new_tokens)`` of ``seq_id`` would take.

        Args:
            seq_id: The sequence.
            start: Its first token to write (its computed tokens so far).
            num_new_tokens: How many tokens the step writes.

        Returns:
            How many free blocks ``allocate_slots`` with the same arguments consumes; a value
            above ``num_free_blocks`` means the write cannot happen now.
        """
        ...

    def allocate_slots(self, seq_id: int, start: int, num_new_tokens: int) -> BlockCopies:
        """Make tokens ``[start, start + num_new_tokens)`` of ``seq_id`` writable.

        Args:
            seq_id: The sequence.
            start: Its first token to write.
            num_new_tokens: How many tokens the step writes.

        Returns:
            Block copies to make before the step (copy-on-write of shared blocks); often empty.
        """
        ...

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Give back what ``seq_id`` holds past its first ``num_tokens`` tokens (rejected draft tokens).

        Args:
            seq_id: The sequence.
            num_tokens: Its tokens whose K/V stay valid; the slots past them were only written by
                draft tokens the step rejected. Policies that reserve up front may keep them.
        """
        ...

    def free(self, seq_id: int) -> None:
        """Release what ``seq_id`` holds, in both pools (finished, aborted or recomputed).

        Args:
            seq_id: The sequence; freeing one that holds nothing is a no-op.
        """
        ...

    def allocate_cached_prefix(self, seq_id: int, token_ids: list[int], salt: str | None = None) -> int:
        """Start ``seq_id``'s table with the cached blocks of its longest cached prefix.

        Args:
            seq_id: A sequence that holds no blocks yet.
            token_ids: Its tokens.
            salt: Only blocks cached under the same salt are shared.

        Returns:
            Tokens whose K/V are thereby already computed (0 without a prefix cache).
        """
        ...

    def cache_blocks(
        self, seq_id: int, token_ids: list[int], num_computed_tokens: int, salt: str | None = None
    ) -> None:
        """Register ``seq_id``'s full blocks among its first ``num_computed_tokens`` tokens for reuse.

        Args:
            seq_id: The sequence.
            token_ids: Its tokens.
            num_computed_tokens: How many of them the step being scheduled will have computed.
            salt: The request's cache salt.
        """
        ...

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        """Whether ``swap_out(seq_ids)`` can move these sequences to host memory now.

        Args:
            seq_ids: All sequences of one request (a group is swapped as a whole).

        Returns:
            False when the host pool lacks room or the allocator has no host pool; the
            scheduler then preempts by recompute.
        """
        ...

    def swap_out(self, seq_ids: list[int]) -> BlockCopies:
        """Move these sequences' blocks to the host pool, releasing their device blocks.

        Args:
            seq_ids: Sequences for which ``can_swap_out`` just returned True.

        Returns:
            (device block, host block) copies the cache engine performs.
        """
        ...

    def num_blocks_needed_to_swap_in(self, seq_ids: list[int], writes: list[tuple[int, int, int]]) -> int:
        """Device blocks ``swap_in(seq_ids)`` takes plus those the step's ``writes`` then need.

        Args:
            seq_ids: Sequences of one swapped-out request.
            writes: (seq_id, start, num_new_tokens) the step will write after the swap-in.

        Returns:
            Free device blocks needed; above ``num_free_blocks`` the request stays swapped.
        """
        ...

    def swap_in(self, seq_ids: list[int]) -> BlockCopies:
        """Bring these sequences' blocks back from the host pool.

        Args:
            seq_ids: Sequences of one swapped-out request.

        Returns:
            (host block, device block) copies the cache engine performs.
        """
        ...

    def usage(self, live: LiveSequences, next_request: tuple[int, int] | None) -> KVUsage:
        """Split every KV slot into token states / reserved / internal and external fragmentation / free.

        Args:
            live: Every running sequence's computed tokens and final length (tokens it will
                ever write: prompt plus output, minus the last sampled token).
            next_request: (prompt length, max tokens) of the request admitted next, if any:
                free slots it could not use count as external fragmentation.

        Returns:
            The breakdown, for ``LLMEngine.kv_usage`` and the memory benchmark.
        """
        ...

    def stats(self) -> dict[str, int]:
        """Pool figures for ``LLMEngine.stats`` (and the Prometheus gauges built on them).

        Returns:
            ``num_kv_blocks``, ``num_free_kv_blocks``, ``peak_used_kv_blocks``, ``block_size``,
            ``num_host_blocks``, ``num_free_host_blocks``, ``num_cached_kv_blocks`` (0 where the
            policy has no such pool or cache).
        """
        ...
