"""Iteration-level scheduling: which tokens of which requests run in the next model step."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from quire.config import SchedulerConfig
from quire.core.kv_allocator import KVAllocator, KVUsage
from quire.core.kv_cache_manager import cdiv
from quire.core.request import Request, RequestStatus, Sequence


class DraftPlanner(Protocol):
    """How many draft tokens a decoding sequence gets this step (speculative decoding's proposer).

    The scheduler reserves that many KV slots past the sequence's end, so the drafts are verified
    in the same forward as the sequence's next token; the proposer fills them in
    (``ScheduledSeq.set_draft_tokens``) between scheduling and executing the step.
    """

    def num_draft_slots(self, request: Request, seq: Sequence, limit: int) -> int:
        """Draft tokens to reserve for ``seq`` (0 for none), at most ``limit``."""
        ...


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` tokens of ``seq``, starting at its first uncomputed position.

    With speculative decoding, the last ``num_draft_slots`` of them are draft tokens past the
    sequence's end: the forward verifies them, and the slots of those rejected are given back.
    """

    request: Request
    seq: Sequence
    num_new_tokens: int
    block_table: list[int] = field(default_factory=list)  # filled in when the slots are allocated
    num_draft_slots: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits pick a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_draft_slots == len(self.seq.token_ids)

    @property
    def input_token_ids(self) -> list[int]:
        """The tokens this chunk feeds the model: the sequence's, then its drafts."""
        end = self.start + self.num_new_tokens - self.num_draft_slots
        return self.seq.token_ids[self.start : end] + self.draft_token_ids

    def set_draft_tokens(self, token_ids: list[int]) -> None:
        """Fill the draft slots the scheduler reserved (the proposer's seam); fewer drafts shorten the chunk.

        Slots left unused are given back with the rejected ones after the step.
        """
        if len(token_ids) > self.num_draft_slots:
            raise ValueError(f"{len(token_ids)} drafts for {self.num_draft_slots} reserved slots")
        self.num_new_tokens -= self.num_draft_slots - len(token_ids)
        self.num_draft_slots = len(token_ids)
        self.draft_token_ids = list(token_ids)

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
    """One step's work: the chunks to compute and the block copies to make first.

    The cache engine applies the block operations in this order before the forward: swap-outs
    (device -> host) read blocks this step may hand to others, swap-ins (host -> device) fill
    blocks that copy-on-write may then read, and copy-on-write copies come last.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def has_block_ops(self) -> bool:
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.has_block_ops


def _stamp_first_scheduled(out: SchedulerOutput) -> None:
    """When each request was first scheduled: its queue time, for the server's metrics."""
    if out.scheduled:
        scheduled_at = time.time()
        for chunk in out.scheduled:
            chunk.request.metrics.setdefault("first_scheduled_time", scheduled_at)


class Scheduler:
    """Waiting, running and swapped queues, filled each step up to a token budget.

    Each step gives running requests their tokens first (decodes, and the next chunk of a
    prompt still being prefilled), then brings swapped requests back, then admits waiting
    requests while the budget, the sequence limit and free blocks allow, so prefills and decodes
    share one batch and long prompts are prefilled in chunks.

    Order: under "fcfs" by arrival; under "priority" by (priority, arrival), lower values
    first, with requests that waited ``priority_aging_steps`` promoted ahead of all others so
    background work always finishes. When a running request cannot get a block, the last
    request in that order is preempted, as a whole group: swapped to the host pool (its K/V
    kept, it returns before new requests are admitted) or recomputed (its blocks freed, it goes
    back to the waiting queue keeping its tokens). ``preemption_mode`` picks: "swap",
    "recompute", or "auto", which swaps groups of several sequences (recomputing would lose
    their sharing) and single sequences of at least ``swap_min_tokens`` computed tokens, and
    recomputes the rest; swapping falls back to recompute when the host pool is full. Under
    "priority", a waiting request that cannot start for lack of blocks or seats also preempts
    strictly less urgent running requests.

    ``max_num_seqs`` counts sequences, not requests: a group takes as many seats as it can run
    sequences (``best_of`` or the beam width before it forks). With prefix caching, a request
    being admitted (new or preempted) first takes the cached blocks of its longest cached
    prefix, so only the rest is computed.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVAllocator, drafts: DraftPlanner | None = None) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.drafts = drafts  # speculative decoding's proposer, or None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_preemptions_by_mode = {"swap": 0, "recompute": 0}
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        # Prefix cache, in tokens: looked up at admission, and found cached (hence not computed).
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0
        # Tokens computed that did not sample a new one: prompts, and recomputes after preemption.
        self.num_prompt_tokens_computed = 0
        # Speculative decoding: chunks that carried drafts, draft tokens verified, and those accepted.
        self.num_spec_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # -- queue management -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        request.queued_at_step = self.num_steps
        self.waiting.append(request)
        for seq in request.seqs:
            self.kv_cache.expect(seq.seq_id, seq.num_prompt_tokens, self._max_tokens(request))

    def finish_request(self, request: Request) -> None:
        """Drop a finished or aborted request from whichever queue holds it and free its blocks (both pools)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.SWAPPED:
            self.swapped.remove(request)
        request.status = RequestStatus.FINISHED
        for seq in request.seqs:
            self.kv_cache.free(seq.seq_id)

    def _max_tokens(self, request: Request) -> int:
        """The most tokens ``request`` may generate: its ``max_tokens``, or what ``max_model_len`` leaves."""
        room = self.config.max_model_len - request.num_prompt_tokens
        max_tokens = request.params.max_tokens
        return room if max_tokens is None else min(max_tokens, room)

    def kv_usage(self, next_request: tuple[int, int] | None = None) -> KVUsage:
        """The allocator's slot breakdown for the running sequences, now.

        The request admitted next is the head of the waiting queue, else ``next_request``
        ((prompt length, max tokens) of one not submitted yet, e.g. held back by a static batch).
        """
        live = {
            s.seq_id: (s.num_computed_tokens, r.num_prompt_tokens + self._max_tokens(r) - 1)
            for r in self.running
            for s in r.seqs
            if not s.is_finished
        }
        if self.waiting:
            head = self.waiting[0]
            next_request = (head.num_prompt_tokens, self._max_tokens(head))
        return self.kv_cache.usage(live, next_request)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` (a new sequence of ``parent``'s request) shares ``parent``'s blocks: reference counts, no copy."""
        self.kv_cache.fork(parent.seq_id, child.seq_id)

    def free_seq(self, seq: Sequence) -> None:
        """Give back the blocks of a sequence that will not run again while its request goes on."""
        self.kv_cache.free(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def _order(self, request: Request) -> tuple[int, int, int]:
        """Sort key: most urgent first (ascending). FCFS is arrival order alone."""
        if self.config.policy == "priority":
            return (not request.promoted, request.priority, request.arrival_order)
        return (0, 0, request.arrival_order)

    def _urgency(self, request: Request) -> tuple[int, int]:
        return self._order(request)[:2]

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.policy == "priority":
            self._promote_aged()
            self.waiting = deque(sorted(self.waiting, key=self._order))
            self.swapped.sort(key=self._order)
            self._preempt_for_urgent_arrival(budget, out)

        num_preempted_for_urgency = len(out.preempted)

        # 1. Running requests in order, so preemption always hits the last one.
        self.running.sort(key=self._order)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            chunks = self._chunks(request, budget)
            if not chunks:
                index += 1
                continue
            if any(c.num_draft_slots for c in chunks) and not self._can_allocate(chunks):
                chunks = self._chunks(request, budget, speculate=False)  # drafts never cost a preemption
            while not self._can_allocate(chunks):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._allocate(chunks, out)
                budget -= sum(c.num_new_tokens for c in chunks)
                index += 1

        # 2. Swapped requests come back, in order, unless running requests just had to be preempted
        # for lack of blocks (bringing others back now would only thrash).
        num_seqs = sum(r.max_running_seqs for r in self.running)
        short_of_blocks = len(out.preempted) > num_preempted_for_urgency
        while self.swapped and budget > 0 and not short_of_blocks:
            request = self.swapped[0]
            if self.waiting and self._urgency(self.waiting[0]) < self._urgency(request):
                break  # under "priority", a more urgent waiting request goes first
            seats = request.max_running_seqs
            if num_seqs + seats > self.config.max_num_seqs:
                break
            chunks = self._chunks(request, budget, speculate=False)
            seq_ids = [s.seq_id for s in request.seqs]
            writes = [(c.seq.seq_id, c.start, c.num_new_tokens) for c in chunks]
            if (
                not chunks
                or self.kv_cache.num_blocks_needed_to_swap_in(seq_ids, writes) > self.kv_cache.num_free_blocks
            ):
                break
            copies = self.kv_cache.swap_in(seq_ids)
            out.blocks_to_swap_in += copies
            self.num_swapped_in_blocks += len(copies)
            self.swapped.pop(0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_seqs += seats
            self._allocate(chunks, out)
            budget -= sum(c.num_new_tokens for c in chunks)

        # 3. Waiting requests in order (recomputed ones were put back in front), once no swapped
        # request is left to return -- except that under "priority" a strictly more urgent one may pass.
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self.swapped and not self._urgency(request) < self._urgency(self.swapped[0]):
                break
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
        _stamp_first_scheduled(out)
        return out

    def mark_computed(self, out: SchedulerOutput) -> None:
        """The step ``out`` describes has run: the K/V of its scheduled tokens are in the cache now."""
        for chunk in out.scheduled:
            if chunk.seq.num_computed_tokens < chunk.seq.num_prompt_tokens or not chunk.samples:
                self.num_prompt_tokens_computed += chunk.num_new_tokens
            # Drafts count once accepted (``accept_drafts``); their slots are held until then.
            chunk.seq.num_computed_tokens += chunk.num_new_tokens - chunk.num_draft_slots
            if chunk.num_draft_slots:
                self.num_spec_drafts += 1
                self.num_draft_tokens += chunk.num_draft_slots

    def accept_drafts(self, chunk: ScheduledSeq, num_accepted: int) -> None:
        """The first ``num_accepted`` drafts of ``chunk`` (verified by the step ``mark_computed`` saw) are
        the sequence's tokens now: their K/V count as computed, and the slots past them go back.

        The sequence's block table ends as if it had decoded those tokens one by one: blocks
        holding only rejected (or unused) draft slots return to the pool, and prefix-cache hashes
        are only ever registered for full blocks of accepted tokens (the next schedule does it).
        """
        assert 0 <= num_accepted <= chunk.num_draft_slots
        self.num_accepted_tokens += num_accepted
        seq = chunk.seq
        seq.num_computed_tokens += num_accepted
        self.kv_cache.truncate(seq.seq_id, seq.num_computed_tokens)

    def _promote_aged(self) -> None:
        limit = self.config.priority_aging_steps
        for request in itertools.chain(self.waiting, self.swapped):
            if not request.promoted and self.num_steps - request.queued_at_step >= limit:
                request.promoted = True

    def _preempt_for_urgent_arrival(self, budget: int, out: SchedulerOutput) -> None:
        """Make room for the most urgent waiting request by preempting strictly less urgent running ones.

        It needs seats for its sequences and blocks for its first chunk (prefix-cache hits not
        counted) on top of what the running requests take for this step's tokens.
        """
        candidates = [q[0] for q in (self.waiting, self.swapped) if q]
        if not candidates or not self.running:
            return
        urgent = min(candidates, key=self._order)
        if urgent.status is RequestStatus.WAITING:
            first_chunk = min(sum(s.num_uncomputed_tokens for s in urgent.unfinished_seqs), budget)
            blocks = cdiv(first_chunk, self.kv_cache.block_size) * urgent.max_running_seqs
        else:
            seq_ids = [s.seq_id for s in urgent.seqs]
            writes = [(s.seq_id, s.num_computed_tokens, s.num_uncomputed_tokens) for s in urgent.unfinished_seqs]
            blocks = self.kv_cache.num_blocks_needed_to_swap_in(seq_ids, writes)
        while self.running:
            victim = max(self.running, key=self._order)
            if not self._urgency(victim) > self._urgency(urgent):
                return
            seats = sum(r.max_running_seqs for r in self.running) + urgent.max_running_seqs
            running_needs = sum(
                self.kv_cache.num_blocks_needed(s.seq_id, s.num_computed_tokens, min(s.num_uncomputed_tokens, budget))
                for r in self.running
                for s in r.unfinished_seqs
            )
            if seats <= self.config.max_num_seqs and running_needs + blocks <= self.kv_cache.num_free_blocks:
                return
            self._preempt(victim, out)

    def _chunks(self, request: Request, budget: int, speculate: bool = True) -> list[ScheduledSeq]:
        """The next tokens of each unfinished sequence of ``request`` that fit in ``budget``.

        A request's sequences run together and sample together: when not all of their tokens
        fit, the budget advances their prompts (or recomputes) in chunks that stop short of
        each sequence's last token, so no sequence of a group samples without the others.
        With ``speculate``, decoding sequences also get the draft slots the proposer asks for,
        when the whole group's drafts fit in the budget.
        """
        seqs = request.unfinished_seqs
        needed = [s.num_uncomputed_tokens for s in seqs]
        if sum(needed) <= budget:
            drafts = [self._draft_slots(request, s) if speculate else 0 for s in seqs]
            if sum(needed) + sum(drafts) > budget:
                drafts = [0] * len(seqs)
            return [
                ScheduledSeq(request, s, n + d, num_draft_slots=d)
                for s, n, d in zip(seqs, needed, drafts, strict=True)
                if n > 0
            ]
        chunks = []
        for seq, num in zip(seqs, needed, strict=True):
            take = min(num - 1, budget)
            if take > 0:
                chunks.append(ScheduledSeq(request, seq, take))
                budget -= take
        return chunks

    def _draft_slots(self, request: Request, seq: Sequence) -> int:
        """Draft tokens ``seq`` may verify this step: only while decoding, and never past its length limits."""
        if self.drafts is None or seq.num_uncomputed_tokens != 1 or seq.num_output_tokens == 0:
            return 0
        # Accepting every draft emits one token more than the drafts (the target's own next token).
        room = min(
            self._max_tokens(request) - seq.num_output_tokens,
            self.config.max_model_len - len(seq.token_ids),
        )
        return self.drafts.num_draft_slots(request, seq, room - 1) if room > 1 else 0

    def _attach_cached_prefix(self, request: Request) -> tuple[int, int]:
        """Give each sequence with nothing computed its cached prefix blocks; returns (queried, hit) tokens.

        A request that wants prompt logprobs gets none: they come from running every prompt position.
        """
        queried = hit = 0
        if not self.kv_cache.enable_prefix_caching or request.prompt_logprobs is not None:
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
            end = chunk.start + chunk.num_new_tokens - chunk.num_draft_slots  # never hash a draft
            self.kv_cache.cache_blocks(seq.seq_id, seq.token_ids, end, chunk.request.cache_salt)
            chunk.block_table = self.kv_cache.block_table(chunk.seq.seq_id)
        out.scheduled += chunks

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take ``request``'s whole group off the device: swap it out, or drop its K/V for recompute."""
        self.running.remove(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.queued_at_step = self.num_steps
        out.preempted.append(request)
        seq_ids = [s.seq_id for s in request.seqs]
        if self._should_swap(request) and self.kv_cache.can_swap_out(seq_ids):
            copies = self.kv_cache.swap_out(seq_ids)
            out.blocks_to_swap_out += copies
            self.num_swapped_out_blocks += len(copies)
            self.num_preemptions_by_mode["swap"] += 1
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
            self.swapped.sort(key=self._order)
            return
        for seq in request.seqs:
            self.kv_cache.free(seq.seq_id)
            seq.num_computed_tokens = 0
        self.num_preemptions_by_mode["recompute"] += 1
        request.status = RequestStatus.WAITING
        if self.config.policy == "priority":
            self.waiting.append(request)
            self.waiting = deque(sorted(self.waiting, key=self._order))
        else:
            self.waiting.appendleft(request)

    def _should_swap(self, request: Request) -> bool:
        mode = self.config.preemption_mode
        if mode != "auto":
            return mode == "swap"
        seqs = request.unfinished_seqs
        if len(seqs) > 1:  # a forked group: recompute would lose its shared blocks
            return True
        return bool(seqs) and seqs[0].num_computed_tokens >= self.config.swap_min_tokens

    # -- introspection ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Queue lengths and the counters this scheduler keeps (a part of ``LLMEngine.stats``)."""
        return {
            "num_preemptions": self.num_preemptions,
            "num_preemptions_swap": self.num_preemptions_by_mode["swap"],
            "num_preemptions_recompute": self.num_preemptions_by_mode["recompute"],
            "num_swapped": len(self.swapped),
            "num_swapped_out_blocks": self.num_swapped_out_blocks,
            "num_swapped_in_blocks": self.num_swapped_in_blocks,
            "num_prompt_tokens_computed": self.num_prompt_tokens_computed,
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_prefix_cache_queries": self.num_prefix_cache_queries,
            "num_prefix_cache_hits": self.num_prefix_cache_hits,
            "num_spec_drafts": self.num_spec_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
        }
