"""Iteration-level scheduling: which tokens of which requests run in the next model step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quire.config import SchedulerConfig
from quire.core.kv_cache_manager import KVCacheManager
from quire.core.request import Request, RequestStatus, Sequence


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` tokens of ``seq``, starting at its first uncomputed position."""

    request: Request
    seq: Sequence
    num_new_tokens: int
    block_table: list[int] = field(default_factory=list)  # filled in when the slots are allocated

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits pick a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq.token_ids)

    @property
    def num_samples(self) -> int:
        """Tokens drawn from this chunk's last logits: ``best_of`` when a parallel-sampling group forks here.

        Beam search forks differently (the engine picks the beams from the top candidates), so
        its prompt sequence samples once like any other.
        """
        request = self.request
        if not self.samples or request.beam is not None or request.group_size == 1 or request.forked:
            return 1
        return request.group_size


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS waiting queue and running set, filled each step up to a token budget.

    Each step gives running requests their tokens first (decodes, and the next chunk of a
    prompt still being prefilled), then admits waiting requests while the budget, the
    sequence limit and free blocks allow, so prefills and decodes share one batch and long
    prompts are prefilled in chunks. When a running request cannot get a block, the most
    recently arrived running request is preempted by recompute: its blocks are freed and it
    goes back to the front of the waiting queue, keeping the tokens it generated.

    ``max_num_seqs`` counts sequences, not requests: a group takes as many seats as it can run
    sequences (``best_of`` or the beam width before it forks). With prefix caching, a request
    being admitted (new or preempted) first takes the cached blocks of its longest cached
    prefix, so only the rest is computed.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Prefix cache, in tokens: looked up at admission, and found cached (hence not computed).
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0

    # -- queue management -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish_request(self, request: Request) -> None:
        """Drop a finished or aborted request from whichever queue holds it and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        for seq in request.seqs:
            self.kv_cache.free(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running requests, oldest first, so preemption always hits the newest.
        self.running.sort(key=lambda r: r.arrival_order)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            chunks = self._chunks(request, budget)
            if not chunks:
                index += 1
                continue
            while not self._can_allocate(chunks):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._allocate(chunks, out)
                budget -= sum(c.num_new_tokens for c in chunks)
                index += 1

        # 2. Waiting requests in arrival order (preempted ones were put back at the front).
        num_seqs = sum(r.max_running_seqs for r in self.running)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            seats = request.max_running_seqs
            if num_seqs + seats > self.config.max_num_seqs:
                break
            queried, hit = self._attach_cached_prefix(request)
            chunks = self._chunks(request, budget)
            if not chunks or not self._can_allocate(chunks):
                self._release(request)
                break
            self.num_prefix_cache_queries += queried
            self.num_prefix_cache_hits += hit
            num_seqs += seats
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._allocate(chunks, out)
            budget -= sum(c.num_new_tokens for c in chunks)
        return out

    def _chunks(self, request: Request, budget: int) -> list[ScheduledSeq]:
        """The next tokens of each unfinished sequence of ``request`` that fit in ``budget``.

        A request's sequences run together and sample together: when not all of their tokens
        fit, the budget advances their prompts (or recomputes) in chunks that stop short of
        each sequence's last token, so no sequence of a group samples without the others.
        """
        seqs = request.unfinished_seqs
        needed = [s.num_uncomputed_tokens for s in seqs]
        if sum(needed) <= budget:
            return [ScheduledSeq(request, s, n) for s, n in zip(seqs, needed, strict=True) if n > 0]
        chunks = []
        for seq, num in zip(seqs, needed, strict=True):
            take = min(num - 1, budget)
            if take > 0:
                chunks.append(ScheduledSeq(request, seq, take))
                budget -= take
        return chunks

    def _attach_cached_prefix(self, request: Request) -> tuple[int, int]:
        """Give each sequence with nothing computed its cached prefix blocks; returns (queried, hit) tokens."""
        queried = hit = 0
        if not self.kv_cache.enable_prefix_caching:
            return queried, hit
        for seq in request.unfinished_seqs:
            if seq.num_computed_tokens == 0 and not self.kv_cache.block_table(seq.seq_id):
                tokens = self.kv_cache.allocate_cached_prefix(seq.seq_id, seq.token_ids, request.cache_salt)
                seq.num_computed_tokens = tokens
                queried += len(seq.token_ids)
                hit += tokens
        return queried, hit

    def _release(self, request: Request) -> None:
        """Undo ``_attach_cached_prefix`` for a request that could not be admitted after all."""
        for seq in request.seqs:
            self.kv_cache.free(seq.seq_id)
            seq.num_computed_tokens = 0

    def _can_allocate(self, chunks: list[ScheduledSeq]) -> bool:
        needed = sum(self.kv_cache.num_blocks_needed(c.seq.seq_id, c.start, c.num_new_tokens) for c in chunks)
        return needed <= self.kv_cache.num_free_blocks

    def _allocate(self, chunks: list[ScheduledSeq], out: SchedulerOutput) -> None:
        for chunk in chunks:
            seq = chunk.seq
            out.blocks_to_copy += self.kv_cache.allocate_slots(seq.seq_id, chunk.start, chunk.num_new_tokens)
            # Blocks this step fills are cached now: a request admitted later in this same step may
            # share them, since every layer writes the step's K/V before any sequence attends.
            end = chunk.start + chunk.num_new_tokens
            self.kv_cache.cache_blocks(seq.seq_id, seq.token_ids, end, chunk.request.cache_salt)
            chunk.block_table = self.kv_cache.block_table(chunk.seq.seq_id)
        out.scheduled += chunks

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the request's K/V; it re-prefills when readmitted."""
        self.running.remove(request)
        for seq in request.seqs:
            self.kv_cache.free(seq.seq_id)
            seq.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
