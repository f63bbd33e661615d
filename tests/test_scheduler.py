"""Scheduler behaviour with fake requests and a simulated engine (no model, no tensors).

The simulated engine does what ``LLMEngine.step`` does with a ``SchedulerOutput``: every scheduled
sequence's ``num_computed_tokens`` advances by its ``num_new_tokens``, and each entry whose chunk
reaches the end of its sequence (``samples``) appends one (fake) token. A request finishes once it
has produced the number of outputs chosen for it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_utils import FAKE_TOKEN, make_request

from quire.config import SchedulerConfig
from quire.core.kv_cache_manager import KVCacheManager, cdiv
from quire.core.request import Request, RequestStatus
from quire.core.scheduler import Scheduler, SchedulerOutput


class SimEngine:
    """A scheduler plus the bookkeeping half of the engine step."""

    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int = 256, max_batched: int = 512):
        self.kv = KVCacheManager(num_blocks, block_size)
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched, max_model_len=1 << 20
        )
        self.scheduler = Scheduler(self.config, self.kv)
        self._orders = itertools.count()
        self.targets: dict[str, int] = {}
        self.requests: dict[str, Request] = {}
        self.finished: list[Request] = []
        self.steps: list[SchedulerOutput] = []
        # Per step, each entry as it was scheduled: (request, start, num_new_tokens, samples).
        # (ScheduledSeq.start and .samples read the live sequence, so they change once it advances.)
        self.records: list[list[tuple[Request, int, int, bool]]] = []

    def add(self, prompt_len: int, num_outputs: int) -> Request:
        request = make_request(next(self._orders), prompt_len)
        self.targets[request.request_id] = num_outputs
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        sched = self.scheduler
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        tokens_before = {r.request_id: list(r.seqs[0].token_ids) for r in self.requests.values()}

        out = sched.schedule()
        check_step(self, out, running_before, waiting_before, tokens_before)
        self.records.append([(e.request, e.start, e.num_new_tokens, e.samples) for e in out.scheduled])

        sampled = []
        for entry in out.scheduled:
            samples = entry.samples  # read before num_computed_tokens moves
            entry.seq.num_computed_tokens += entry.num_new_tokens
            if samples:
                entry.seq.token_ids.append(FAKE_TOKEN)
                sampled.append(entry.request)
        for request in sampled:
            seq = request.seqs[0]
            if seq.num_output_tokens >= self.targets[request.request_id]:
                seq.finish_reason = "length"
                sched.finish_request(request)
                assert request.status is RequestStatus.FINISHED
                self.finished.append(request)
                del self.requests[request.request_id]
        check_pool(self.kv)
        self.steps.append(out)
        return out

    def run(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps: livelock?")


def check_pool(kv: KVCacheManager) -> None:
    refs: dict[int, int] = {}
    for table in kv.block_tables.values():
        assert len(set(table)) == len(table)
        for b in table:
            refs[b] = refs.get(b, 0) + 1
    for b in range(kv.pool.num_blocks):
        assert kv.pool.ref_counts[b] == refs.get(b, 0)
    assert not set(kv.pool._free) & set(refs)
    assert kv.num_free_blocks + len(refs) == kv.pool.num_blocks


def check_step(sim: SimEngine, out: SchedulerOutput, running_before, waiting_before, tokens_before) -> None:
    """Per-step invariants, checked right after schedule() (before the engine advances anything)."""
    sched, kv, config = sim.scheduler, sim.kv, sim.config
    assert out.num_batched_tokens <= config.max_num_batched_tokens, "token budget exceeded"
    assert len(sched.running) <= config.max_num_seqs
    seq_ids = [e.seq.seq_id for e in out.scheduled]
    assert len(set(seq_ids)) == len(seq_ids), "a sequence was scheduled twice in one step"

    for entry in out.scheduled:
        seq = entry.seq
        assert entry.num_new_tokens >= 1
        assert entry.start + entry.num_new_tokens <= len(seq.token_ids)
        assert entry.request in sched.running and entry.request.status is RequestStatus.RUNNING
        assert entry.samples == (entry.start + entry.num_new_tokens == len(seq.token_ids))
        # The slots for this chunk exist (and only those: blocks are allocated on demand).
        table = kv.block_table(seq.seq_id)
        assert entry.block_table == table
        assert len(table) == cdiv(entry.start + entry.num_new_tokens, kv.block_size)
    assert out.blocks_to_copy == [], "no sequence shares blocks here"

    # Preemption is recompute: blocks freed, progress reset, tokens kept, back in front of waiting.
    scheduled_requests = {id(e.request) for e in out.scheduled}
    for request in out.preempted:
        assert request in running_before
        assert request.seqs[0].token_ids == tokens_before[request.request_id], "preemption must keep tokens"
        if id(request) not in scheduled_requests:
            assert request.status is RequestStatus.WAITING
            assert request.seqs[0].num_computed_tokens == 0
            assert request.seqs[0].seq_id not in kv.block_tables
    assert len(sched.running) + len(sched.waiting) == len(running_before) + len(waiting_before)
    for request in sched.waiting:
        assert request.status is RequestStatus.WAITING
        assert request.seqs[0].num_computed_tokens == 0
        assert request.seqs[0].seq_id not in kv.block_tables

    # Running requests go first: a newly admitted request only gets tokens once every request that
    # was already running (and was not preempted) got its own, and it comes after them in the batch.
    still_running = [r for r in running_before if r not in out.preempted]
    positions = {id(e.request): i for i, e in enumerate(out.scheduled)}
    admitted = [e.request for e in out.scheduled if e.request not in still_running]
    if admitted:
        for request in still_running:
            assert id(request) in positions, f"{request.request_id} was skipped for a new request"
        first_admitted = min(positions[id(r)] for r in admitted)
        assert all(positions[id(r)] < first_admitted for r in still_running)
    assert [positions[id(r)] for r in still_running if id(r) in positions] == sorted(
        positions[id(r)] for r in still_running if id(r) in positions
    ), "running requests are served oldest first"
    # FCFS overall: the queue stays in arrival order, and nobody runs while an older request waits
    # (preempted requests are always the newest running ones and go back to the front).
    waiting_orders = [r.arrival_order for r in sched.waiting]
    assert waiting_orders == sorted(waiting_orders)
    if sched.running and sched.waiting:
        assert max(r.arrival_order for r in sched.running) < min(waiting_orders)
    # Waiting requests are admitted in queue order (FCFS, preempted ones were put in front).
    admitted_from_waiting = [r for r in admitted if r in waiting_before]
    assert admitted_from_waiting == waiting_before[: len(admitted_from_waiting)]


# -- targeted tests -------------------------------------------------------------------------


def test_token_budget_respected_every_step():
    sim = SimEngine(num_blocks=200, block_size=16, max_batched=64)
    for prompt_len, outputs in [(100, 5), (30, 20), (64, 3), (1, 40), (200, 2), (63, 1)]:
        sim.add(prompt_len, outputs)
    sim.run()
    assert all(out.num_batched_tokens <= 64 for out in sim.steps)
    assert max(out.num_batched_tokens for out in sim.steps) == 64, "the budget should be filled when possible"


def test_decodes_are_scheduled_before_new_prefills():
    sim = SimEngine(num_blocks=100, block_size=16, max_batched=32)
    a = sim.add(prompt_len=10, num_outputs=10)
    b = sim.add(prompt_len=12, num_outputs=10)
    first = sim.step()
    assert [(e.request, e.num_new_tokens) for e in first.scheduled] == [(a, 10), (b, 12)]
    c = sim.add(prompt_len=50, num_outputs=3)
    out = sim.step()
    # Both decodes first, then the new prompt gets what is left of the budget.
    assert [(e.request, e.num_new_tokens, e.samples) for e in out.scheduled] == [
        (a, 1, True),
        (b, 1, True),
        (c, 30, False),
    ]
    assert out.num_batched_tokens == 32


def test_a_full_budget_of_decodes_leaves_new_prompts_waiting():
    sim = SimEngine(num_blocks=100, block_size=4, max_batched=3)
    reqs = [sim.add(prompt_len=1, num_outputs=5) for _ in range(3)]
    sim.step()  # three 1-token prompts fill the budget
    late = sim.add(prompt_len=1, num_outputs=1)
    out = sim.step()
    assert [e.request for e in out.scheduled] == reqs
    assert late.status is RequestStatus.WAITING


def test_long_prompt_is_prefilled_in_chunks_and_only_the_last_chunk_samples():
    sim = SimEngine(num_blocks=100, block_size=16, max_batched=256)
    req = sim.add(prompt_len=1000, num_outputs=2)
    seq = req.seqs[0]
    chunks = []
    for expected_start, expected_len in [(0, 256), (256, 256), (512, 256), (768, 232)]:
        out = sim.scheduler.schedule()
        (entry,) = out.scheduled
        assert (entry.start, entry.num_new_tokens) == (expected_start, expected_len)
        chunks.append(entry.samples)
        assert len(sim.kv.block_table(seq.seq_id)) == cdiv(expected_start + expected_len, 16)
        if entry.samples:
            seq.token_ids.append(FAKE_TOKEN)
        seq.num_computed_tokens += entry.num_new_tokens
    assert chunks == [False, False, False, True]
    assert seq.num_computed_tokens == 1000 and seq.num_output_tokens == 1
    assert len(sim.kv.block_table(seq.seq_id)) == 63
    # Then it decodes one token per step.
    out = sim.scheduler.schedule()
    (entry,) = out.scheduled
    assert (entry.start, entry.num_new_tokens, entry.samples) == (1000, 1, True)


def test_chunked_prompt_run_to_completion_takes_four_prefill_steps():
    sim = SimEngine(num_blocks=100, block_size=16, max_batched=256)
    sim.add(prompt_len=1000, num_outputs=3)
    sim.run()
    assert [out.num_batched_tokens for out in sim.steps] == [256, 256, 256, 232, 1, 1]
    assert [rec[0][3] for rec in sim.records] == [False, False, False, True, True, True]
    assert sim.kv.num_free_blocks == 100


def test_prefill_and_decode_share_a_step():
    sim = SimEngine(num_blocks=100, block_size=8, max_batched=100)
    a = sim.add(prompt_len=5, num_outputs=4)
    sim.step()
    b = sim.add(prompt_len=20, num_outputs=2)
    out = sim.step()
    assert sim.records[-1] == [(a, 5, 1, True), (b, 0, 20, True)]
    assert out.num_batched_tokens == 21


def test_max_num_seqs_is_respected():
    sim = SimEngine(num_blocks=100, block_size=4, max_num_seqs=2, max_batched=1000)
    reqs = [sim.add(prompt_len=3, num_outputs=n) for n in (1, 3, 2, 1, 1)]
    out = sim.step()
    assert [e.request for e in out.scheduled] == reqs[:2]
    # reqs[0] finished after one output, which frees a slot for reqs[2] (not more).
    out = sim.step()
    assert [e.request for e in out.scheduled] == [reqs[1], reqs[2]]
    sim.run()
    assert max(len(out.scheduled) for out in sim.steps) == 2
    assert [r.request_id for r in sim.finished] == ["r0", "r1", "r2", "r3", "r4"]


def test_fcfs_admission_in_arrival_order():
    sim = SimEngine(num_blocks=100, block_size=4, max_num_seqs=1, max_batched=1000)
    reqs = [sim.add(prompt_len=p, num_outputs=2) for p in (9, 2, 30, 1)]
    sim.run()
    first_scheduled = []
    for out in sim.steps:
        for e in out.scheduled:
            if e.request not in first_scheduled:
                first_scheduled.append(e.request)
    assert first_scheduled == reqs
    assert sim.finished == reqs


def test_fcfs_head_of_line_blocks_smaller_requests_behind_it():
    # 4 blocks of 4 tokens. r0 holds 2 blocks; r1 needs 3 and must wait; r2 (1 block) must not jump it.
    sim = SimEngine(num_blocks=4, block_size=4, max_batched=64)
    r0 = sim.add(prompt_len=6, num_outputs=2)
    sim.step()
    r1 = sim.add(prompt_len=12, num_outputs=1)
    r2 = sim.add(prompt_len=2, num_outputs=1)
    out = sim.step()
    assert [e.request for e in out.scheduled] == [r0]
    assert list(sim.scheduler.waiting) == [r1, r2]
    sim.run()
    assert sim.finished == [r0, r1, r2]


def test_preemption_hits_the_most_recent_request_and_is_recompute():
    # 6 blocks of 4 tokens; three 7-token prompts take 2 blocks each and fill the pool.
    sim = SimEngine(num_blocks=6, block_size=4, max_batched=64)
    r0, r1, r2 = (sim.add(prompt_len=7, num_outputs=4) for _ in range(3))
    sim.step()  # prefill all three (tokens 0..6), each samples token 7
    sim.step()  # decode token 7: fits in each second block
    assert sim.kv.num_free_blocks == 0
    assert sim.scheduler.num_preemptions == 0
    r3 = sim.add(prompt_len=1, num_outputs=1)
    tokens_r2 = list(r2.seqs[0].token_ids)
    assert len(tokens_r2) == 9

    out = sim.scheduler.schedule()  # token 8 of r0 and r1 needs a third block each
    assert out.preempted == [r2]
    assert sim.scheduler.num_preemptions == 1
    assert r2.num_preemptions == 1
    assert r2.status is RequestStatus.WAITING
    assert r2.seqs[0].num_computed_tokens == 0
    assert r2.seqs[0].token_ids == tokens_r2, "generated tokens are kept"
    assert sim.kv.block_table(r2.seqs[0].seq_id) == []
    assert list(sim.scheduler.waiting) == [r2, r3], "the preempted request goes to the front"
    assert sim.scheduler.running == [r0, r1]
    assert [(e.request, e.num_new_tokens) for e in out.scheduled] == [(r0, 1), (r1, 1)]
    assert sim.kv.num_free_blocks == 0
    for e in out.scheduled:
        e.seq.num_computed_tokens += e.num_new_tokens
        e.seq.token_ids.append(FAKE_TOKEN)

    # r0 and r1 finish at 4 outputs (one more step); then r2 recomputes all 9 tokens from 0.
    sim.run()
    r2_entries = [rec for step in sim.records[2:] for rec in step if rec[0] is r2]
    assert r2_entries[0] == (r2, 0, 9, True)
    assert r2.seqs[0].token_ids[:9] == tokens_r2
    assert r2.seqs[0].num_output_tokens == 4
    readmitted = [rec[0] for step in sim.records[2:] for rec in step if rec[0] in (r2, r3)]
    assert readmitted[0] is r2, "the preempted request is readmitted before the one that queued behind it"
    assert r3 in readmitted
    assert sim.scheduler.num_preemptions == 1
    assert sim.kv.num_free_blocks == 6


def test_several_preemptions_in_one_step_keep_arrival_order_in_waiting():
    # 8 blocks of 2 tokens; four 3-token prompts take 2 blocks each and fill the pool.
    sim = SimEngine(num_blocks=8, block_size=2, max_batched=64)
    r0, r1, r2, r3 = (sim.add(prompt_len=3, num_outputs=6) for _ in range(4))
    sim.step()  # prefill, sample token 3
    sim.step()  # decode token 3 (second block), sample token 4
    assert sim.kv.num_free_blocks == 0
    late = sim.add(prompt_len=1, num_outputs=1)

    out = sim.scheduler.schedule()  # token 4 needs a third block for everyone
    # r0 takes r3's blocks, r1 takes one of the two freed, r2 has to give way itself.
    assert out.preempted == [r3, r2]
    assert [(e.request, e.num_new_tokens) for e in out.scheduled] == [(r0, 1), (r1, 1)]
    assert list(sim.scheduler.waiting) == [r2, r3, late]
    assert sim.scheduler.num_preemptions == 2
    assert r2.num_preemptions == r3.num_preemptions == 1
    assert all(r.seqs[0].num_computed_tokens == 0 and len(r.seqs[0].token_ids) == 5 for r in (r2, r3))


def test_finish_request_frees_blocks_and_works_for_waiting_requests():
    sim = SimEngine(num_blocks=10, block_size=4, max_num_seqs=1)
    a = sim.add(prompt_len=9, num_outputs=5)
    b = sim.add(prompt_len=3, num_outputs=5)
    sim.step()
    assert sim.kv.num_free_blocks == 7
    sim.scheduler.finish_request(b)  # abort while waiting
    assert b.status is RequestStatus.FINISHED and b not in sim.scheduler.waiting
    sim.scheduler.finish_request(a)  # abort while running
    assert a.status is RequestStatus.FINISHED and not sim.scheduler.running
    assert sim.kv.num_free_blocks == 10
    assert not sim.scheduler.has_unfinished_requests()
    assert sim.scheduler.schedule().is_empty


def test_everything_completes_and_the_pool_is_fully_free():
    sim = SimEngine(num_blocks=12, block_size=4, max_num_seqs=4, max_batched=20)
    specs = [(5, 9), (17, 3), (1, 1), (30, 12), (8, 8), (2, 20), (11, 4)]
    for prompt_len, outputs in specs:
        sim.add(prompt_len, outputs)
    sim.run()
    assert sim.scheduler.num_preemptions > 0, "the pool is small enough to force preemption"
    assert sorted((r.num_prompt_tokens, r.seqs[0].num_output_tokens) for r in sim.finished) == sorted(specs)
    assert sim.kv.num_free_blocks == 12
    assert sim.kv.pool.ref_counts == [0] * 12
    assert sim.kv.block_tables == {}
    assert not sim.scheduler.running and not sim.scheduler.waiting


# -- random workloads -----------------------------------------------------------------------


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    specs = draw(
        st.lists(
            st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 15)),  # prompt, outputs, arrival step
            min_size=1,
            max_size=8,
        )
    )
    # Every request must fit alone (prompt + outputs - 1 tokens get K/V), otherwise nothing can finish it.
    min_blocks = max(cdiv(p + o - 1, block_size) for p, o, _ in specs)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 6))
    max_num_seqs = draw(st.integers(1, 6))
    max_batched = draw(st.integers(1, 80))
    return block_size, num_blocks, max_num_seqs, max_batched, sorted(specs, key=lambda s: s[2])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_with_exact_outputs_and_a_free_pool(workload):
    block_size, num_blocks, max_num_seqs, max_batched, specs = workload
    sim = SimEngine(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, max_batched=max_batched)
    pending = list(specs)
    added: list[tuple[Request, int]] = []
    step = 0
    while pending or sim.scheduler.has_unfinished_requests():
        while pending and pending[0][2] <= step:
            prompt_len, outputs, _ = pending.pop(0)
            added.append((sim.add(prompt_len, outputs), outputs))
        sim.step()  # check_step asserts the budget, max_num_seqs, ordering and preemption rules
        step += 1
        assert step < 20_000, "livelock"
    assert len(sim.finished) == len(specs)
    for request, outputs in added:
        assert request.status is RequestStatus.FINISHED
        assert request.seqs[0].num_output_tokens == outputs
        assert request.seqs[0].token_ids[: request.num_prompt_tokens] == request.prompt_token_ids
    assert sim.kv.num_free_blocks == num_blocks
    assert sim.kv.pool.ref_counts == [0] * num_blocks
    assert sim.kv.block_tables == {}
    assert all(out.num_batched_tokens <= max_batched for out in sim.steps)


@pytest.mark.parametrize("max_batched", [1, 2, 7])
def test_tiny_budgets_still_make_progress(max_batched):
    sim = SimEngine(num_blocks=6, block_size=2, max_num_seqs=3, max_batched=max_batched)
    for prompt_len, outputs in [(5, 3), (4, 4), (3, 2)]:
        sim.add(prompt_len, outputs)
    sim.run(max_steps=1000)
    assert sim.kv.num_free_blocks == 6
    assert all(out.num_batched_tokens <= max_batched for out in sim.steps)
