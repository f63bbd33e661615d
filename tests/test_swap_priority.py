"""Swap preemption, priority scheduling and abort in the scheduler, with a simulated engine (no model).

The simulated engine advances ``num_computed_tokens`` and appends a fake token per sampling chunk,
like ``tests/test_scheduler.py``; here requests may be groups of several sequences (forked with
shared blocks, as the real engine forks them) so swapping has sharing to preserve.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_utils import FAKE_TOKEN, make_request

from quire.config import SchedulerConfig
from quire.core.kv_cache_manager import KVCacheManager, cdiv
from quire.core.request import Request, RequestStatus, Sequence
from quire.core.scheduler import Scheduler, SchedulerOutput


class Sim:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        mode: str = "swap",
        policy: str = "fcfs",
        max_num_seqs: int = 256,
        max_batched: int = 512,
        aging: int = 1000,
    ):
        self.kv = KVCacheManager(num_blocks, block_size, num_host_blocks=num_host_blocks)
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=1 << 20,
            policy=policy,
            preemption_mode=mode,
            priority_aging_steps=aging,
        )
        self.scheduler = Scheduler(self.config, self.kv)
        self._orders = itertools.count()
        self._seq_ids = itertools.count()
        self.targets: dict[str, int] = {}
        self.live: dict[str, Request] = {}
        self.finished: list[Request] = []
        self.first_token_step: dict[str, int] = {}
        self.steps = 0

    def add(self, prompt_len: int, num_outputs: int, group: int = 1, priority: int = 0) -> Request:
        order = next(self._orders)
        request = make_request(order, prompt_len, seq_id=next(self._seq_ids), priority=priority, group_size=group)
        self.targets[request.request_id] = num_outputs
        self.live[request.request_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.steps += 1
        check_invariants(self, out)
        sampled: list[tuple[Request, Sequence, int]] = []
        for entry in out.scheduled:
            count = entry.num_samples
            samples = entry.samples
            entry.seq.num_computed_tokens += entry.num_new_tokens
            if samples:
                sampled.append((entry.request, entry.seq, count))
        for request, seq, count in sampled:
            self.first_token_step.setdefault(request.request_id, self.steps)
            for index in range(1, count):  # fork like the engine: children share the parent's blocks
                child = Sequence(
                    seq_id=next(self._seq_ids),
                    index=index,
                    token_ids=list(seq.token_ids),
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_computed_tokens=seq.num_computed_tokens,
                )
                self.kv.fork(seq.seq_id, child.seq_id)
                request.seqs.append(child)
            for member in request.seqs[-count:] if count > 1 else [seq]:
                member.token_ids.append(FAKE_TOKEN + member.index)  # forked sequences diverge
                if member.num_output_tokens >= self.targets[request.request_id]:
                    member.finish_reason = "length"
        for request, _, _ in sampled:
            if request.is_finished and request.request_id in self.live:
                self.scheduler.finish_request(request)
                self.finished.append(request)
                del self.live[request.request_id]
        return out

    def abort(self, request: Request) -> None:
        for seq in request.unfinished_seqs:
            seq.finish_reason = "abort"
        self.scheduler.finish_request(request)
        del self.live[request.request_id]

    def run(self, max_steps: int = 20_000) -> None:
        while self.scheduler.has_unfinished_requests():
            self.step()
            assert self.steps < max_steps, "livelock"


def check_pools(kv: KVCacheManager) -> None:
    """Reference counts equal the table entries in both pools, and free lists hold exactly the rest."""
    for tables, pool in ((kv.block_tables, kv.pool), (kv.host_tables, kv.host_pool)):
        if pool is None:
            assert not tables
            continue
        refs: dict[int, int] = {}
        for table in tables.values():
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        assert [pool.ref_counts[b] for b in range(pool.num_blocks)] == [refs.get(b, 0) for b in range(pool.num_blocks)]
        assert pool.num_free + len(refs) == pool.num_blocks


def check_invariants(sim: Sim, out: SchedulerOutput) -> None:
    sched, kv = sim.scheduler, sim.kv
    assert out.num_batched_tokens <= sim.config.max_num_batched_tokens
    assert sum(r.max_running_seqs for r in sched.running) <= sim.config.max_num_seqs
    check_pools(kv)
    for request in sched.running:
        assert request.status is RequestStatus.RUNNING
    for request in sched.swapped:  # all-or-nothing: every live sequence is on the host, none on the device
        assert request.status is RequestStatus.SWAPPED
        for seq in request.unfinished_seqs:
            assert seq.seq_id not in kv.block_tables
            assert len(kv.host_tables[seq.seq_id]) == cdiv(seq.num_computed_tokens, kv.block_size)
    for request in sched.waiting:
        assert request.status is RequestStatus.WAITING
        assert all(s.num_computed_tokens == 0 and s.seq_id not in kv.block_tables for s in request.seqs)
    # Block operations never touch one block twice, and swaps pair each side's blocks one to one.
    for pairs in (out.blocks_to_swap_out, out.blocks_to_swap_in):
        assert len({s for s, _ in pairs}) == len(pairs) == len({d for _, d in pairs})
    # Under FCFS no new request is admitted while a swapped one waits to come back.
    if sim.config.policy == "fcfs" and sched.swapped:
        admitted = {id(e.request) for e in out.scheduled} - {id(r) for r in sched.running if r.num_preemptions}
        for entry in out.scheduled:
            if id(entry.request) in admitted and entry.start == 0 and entry.request.num_preemptions == 0:
                assert entry.request.arrival_order < min(r.arrival_order for r in sched.swapped)


# -- swap --------------------------------------------------------------------------------


def test_swap_moves_the_whole_group_and_brings_it_back_before_new_requests():
    # 8 blocks of 4; a group of 3 forks after a 6-token prompt, sharing its first (full) block.
    sim = Sim(num_blocks=8, block_size=4, num_host_blocks=16, mode="swap")
    group = sim.add(prompt_len=6, num_outputs=6, group=3)
    single = sim.add(prompt_len=7, num_outputs=12)
    sim.step()  # both prefill; the group forks into 3 sequences
    assert len(group.seqs) == 3
    sim.step()
    sim.step()
    before = {s.seq_id: list(sim.kv.block_table(s.seq_id)) for s in group.seqs}
    distinct = len({b for t in before.values() for b in t})
    late = sim.add(prompt_len=2, num_outputs=1)
    # Keep stepping until the pool forces the newest running request (the single one) or the group out.
    for _ in range(20):
        out = sim.step()
        if sim.scheduler.swapped:
            break
    victim = sim.scheduler.swapped[0]
    assert victim.status is RequestStatus.SWAPPED
    assert out.blocks_to_swap_out and sim.scheduler.num_swapped_out_blocks == len(out.blocks_to_swap_out)
    if victim is group:
        assert len(out.blocks_to_swap_out) >= distinct - 1  # shared blocks are moved once
        host_tables = [sim.kv.host_tables[s.seq_id] for s in group.seqs]
        assert host_tables[0][0] == host_tables[1][0] == host_tables[2][0], "sharing kept on the host"
    assert all(s.num_computed_tokens > 0 for s in victim.unfinished_seqs), "swapping keeps the computed K/V"
    sim.run()
    assert {r.request_id for r in sim.finished} == {group.request_id, single.request_id, late.request_id}
    assert sim.scheduler.num_swapped_in_blocks == sim.scheduler.num_swapped_out_blocks
    assert sim.kv.num_free_blocks == 8 and sim.kv.num_free_host_blocks == 16


def test_host_pool_too_small_falls_back_to_recompute():
    sim = Sim(num_blocks=6, block_size=4, num_host_blocks=1, mode="swap")
    for _ in range(3):
        sim.add(prompt_len=7, num_outputs=6)
    sim.run()
    assert sim.scheduler.num_preemptions_by_mode["recompute"] > 0
    assert sim.scheduler.num_preemptions_by_mode["swap"] == 0
    assert sim.kv.num_free_blocks == 6 and sim.kv.num_free_host_blocks == 1


def test_auto_swaps_groups_and_recomputes_short_single_sequences():
    sim = Sim(num_blocks=8, block_size=4, num_host_blocks=32, mode="auto")
    sim.config = sim.scheduler.config = SchedulerConfig(
        max_num_seqs=256, max_num_batched_tokens=512, max_model_len=1 << 20, preemption_mode="auto", swap_min_tokens=64
    )
    single = sim.add(prompt_len=5, num_outputs=10)
    group = sim.add(prompt_len=5, num_outputs=10, group=2)
    preempted_group = preempted_single = False
    while sim.scheduler.has_unfinished_requests():
        out = sim.step()
        for request in out.preempted:
            if request is group:
                preempted_group = True
                assert request.status in (RequestStatus.SWAPPED, RequestStatus.RUNNING)
            if request is single:
                preempted_single = True
                assert request.status in (RequestStatus.WAITING, RequestStatus.RUNNING)  # 5..14 tokens < 64
    assert preempted_group or preempted_single
    assert sim.kv.num_free_blocks == 8 and sim.kv.num_free_host_blocks == 32


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    specs = draw(
        st.lists(
            st.tuples(st.integers(1, 40), st.integers(1, 16), st.sampled_from([1, 1, 2, 3]), st.integers(0, 12)),
            min_size=1,
            max_size=7,
        )
    )
    # A group must fit unshared (as after a recompute), or it could never finish.
    min_blocks = max(g * cdiv(p + o, block_size) for p, o, g, _ in specs)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 8))
    num_host_blocks = draw(st.integers(0, 3 * min_blocks))
    max_num_seqs = draw(st.integers(max(g for _, _, g, _ in specs), 8))
    max_batched = draw(st.integers(max(g for _, _, g, _ in specs), 64))
    mode = draw(st.sampled_from(["swap", "recompute", "auto"]))
    policy = draw(st.sampled_from(["fcfs", "priority"]))
    priorities = draw(st.lists(st.integers(0, 2), min_size=len(specs), max_size=len(specs)))
    aborts = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=3))
    return block_size, num_blocks, num_host_blocks, max_num_seqs, max_batched, mode, policy, specs, priorities, aborts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_with_swap_priority_and_aborts_finish_with_both_pools_free(workload):
    block_size, num_blocks, num_host, max_seqs, max_batched, mode, policy, specs, priorities, aborts = workload
    sim = Sim(
        num_blocks=num_blocks,
        block_size=block_size,
        num_host_blocks=num_host,
        mode=mode,
        policy=policy,
        max_num_seqs=max_seqs,
        max_batched=max_batched,
        aging=5,
    )
    pending = sorted(zip(specs, priorities, strict=True), key=lambda s: s[0][3])
    added: list[Request] = []
    aborted: set[str] = set()
    step = 0
    while pending or sim.scheduler.has_unfinished_requests():
        while pending and pending[0][0][3] <= step:
            (prompt_len, outputs, group, _), prio = pending.pop(0)
            added.append(sim.add(prompt_len, outputs, group, prio if policy == "priority" else 0))
        for at, which in aborts:  # abort from whatever state the request is in
            if at == step and which < len(added) and added[which].request_id in sim.live:
                aborted.add(added[which].request_id)
                sim.abort(added[which])
                check_pools(sim.kv)
        sim.step()
        step += 1
        assert step < 20_000, "livelock"
    for request in added:
        assert request.status is RequestStatus.FINISHED
        if request.request_id not in aborted:
            assert all(s.num_output_tokens == sim.targets[request.request_id] for s in request.seqs)
            assert len(request.seqs) == request.group_size
    assert sim.kv.num_free_blocks == num_blocks and sim.kv.num_free_host_blocks == num_host
    assert not sim.kv.block_tables and not sim.kv.host_tables


def test_abort_in_every_state_frees_both_pools():
    sim = Sim(num_blocks=8, block_size=4, num_host_blocks=8, mode="swap", max_batched=8)
    long_prompt = sim.add(prompt_len=20, num_outputs=4)  # prefilled in 8-token chunks
    sim.step()
    assert long_prompt.status is RequestStatus.RUNNING and 0 < long_prompt.seqs[0].num_computed_tokens < 20
    waiting = sim.add(prompt_len=3, num_outputs=2)
    sim.abort(long_prompt)  # running, mid-prefill
    sim.abort(waiting)  # waiting
    check_pools(sim.kv)
    assert sim.kv.num_free_blocks == 8

    a = sim.add(prompt_len=7, num_outputs=20)
    b = sim.add(prompt_len=7, num_outputs=20)
    for _ in range(40):
        sim.step()
        if sim.scheduler.swapped:
            break
    swapped = sim.scheduler.swapped[0]
    assert sim.kv.num_free_host_blocks < 8
    sim.abort(swapped)  # swapped
    assert swapped.status is RequestStatus.FINISHED
    assert sim.kv.num_free_host_blocks == 8
    other = a if swapped is b else b
    sim.abort(other)  # running, decoding
    assert sim.kv.num_free_blocks == 8 and not sim.scheduler.has_unfinished_requests()


# -- priority ----------------------------------------------------------------------------


def _steps_to_first_token(policy: str) -> int:
    sim = Sim(num_blocks=64, block_size=4, num_host_blocks=64, policy=policy, max_num_seqs=2)
    for _ in range(6):
        sim.add(prompt_len=8, num_outputs=20, priority=5 if policy == "priority" else 0)
    for _ in range(3):
        sim.step()
    urgent = sim.add(prompt_len=8, num_outputs=4, priority=0)
    arrived = sim.steps
    sim.run()
    assert len(sim.finished) == 7, "the low-priority work finishes too"
    return sim.first_token_step[urgent.request_id] - arrived


def test_an_urgent_request_preempts_less_urgent_work_and_starts_at_once():
    fcfs, priority = _steps_to_first_token("fcfs"), _steps_to_first_token("priority")
    assert priority == 1
    assert fcfs > 20


def test_priority_orders_the_waiting_queue_and_the_victims():
    sim = Sim(num_blocks=64, block_size=4, policy="priority", max_num_seqs=1)
    low, high, mid = sim.add(4, 3, priority=9), sim.add(4, 3, priority=1), sim.add(4, 3, priority=5)
    sim.run()
    assert [r.request_id for r in sim.finished] == [high.request_id, mid.request_id, low.request_id]


def test_starvation_guard_promotes_a_request_that_waited_too_long():
    def run(aging: int) -> int:
        sim = Sim(num_blocks=64, block_size=4, policy="priority", max_num_seqs=1, aging=aging)
        background = sim.add(4, 2, priority=9)
        finished_at = None
        for step in range(200):  # a stream of urgent work that never lets up
            if step % 2 == 0:
                sim.add(4, 2, priority=0)
            sim.step()
            if background.status is RequestStatus.FINISHED:
                finished_at = step
                break
        return finished_at

    assert run(aging=10) is not None and run(aging=10) < 20
    assert run(aging=10_000) is None, "without promotion the background request starves"


def test_priority_needs_the_priority_policy():
    with pytest.raises(ValueError, match="scheduling_policy"):
        from quire.config import EngineArgs

        EngineArgs(scheduling_policy="lottery").validate()
