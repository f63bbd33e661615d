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
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

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
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            chunks = self._chunks(request, budget)
            if not chunks or not self._can_allocate(chunks):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._allocate(chunks, out)
            budget -= sum(c.num_new_tokens for c in chunks)
        return out

    def _chunks(self, request: Request, budget: int) -> list[ScheduledSeq]:
        """The next tokens of each unfinished sequence of ``request`` that fit in ``budget``.

        A request's sequences run together or not at all.
        """
        seqs = request.unfinished_seqs
        if len(seqs) == 1:
            seq = seqs[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            return [ScheduledSeq(request, seq, num_new)] if num_new > 0 else []
        needed = [s.num_uncomputed_tokens for s in seqs]
        if sum(needed) > budget:
            return []
        return [ScheduledSeq(request, s, n) for s, n in zip(seqs, needed, strict=True) if n > 0]

    def _can_allocate(self, chunks: list[ScheduledSeq]) -> bool:
        needed = sum(
            self.kv_cache.num_blocks_needed(c.seq.seq_id, c.start, c.num_new_tokens) for c in chunks
        )
        return needed <= self.kv_cache.num_free_blocks

    def _allocate(self, chunks: list[ScheduledSeq], out: SchedulerOutput) -> None:
        for chunk in chunks:
            out.blocks_to_copy += self.kv_cache.allocate_slots(
                chunk.seq.seq_id, chunk.start, chunk.num_new_tokens
            )
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
