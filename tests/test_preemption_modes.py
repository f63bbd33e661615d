"""Swap and recompute preemption, priority scheduling and abort on real models.

The default model (SmolLM2-135M) for output identity and the restored K/V; the tiny random Llama
for the hypothesis-driven abort test, whose many engine steps must stay cheap.
"""

from __future__ import annotations

import random
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire import LLM, BeamSearchParams, SamplingParams
from quire.core.request import RequestStatus

pytestmark = pytest.mark.slow


def _unique_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 20000) for _ in range(length)]


PROMPTS = [{"prompt_token_ids": _unique_prompt(500 + i, 20 + 9 * i)} for i in range(5)]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=28, ignore_eos=True),
    SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True),
    BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True),
    SamplingParams(n=2, best_of=3, temperature=1.0, seed=8, max_tokens=18, ignore_eos=True),
]


def _finish(engine) -> dict:
    last = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            last[output.request_id] = output
    return last


def _run(llm: LLM) -> dict:
    engine = llm.engine
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        engine.add_request(f"p{i}", prompt, params)
    return {rid: [o.token_ids for o in out.outputs] for rid, out in _finish(engine).items()}


def _assert_pools_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_free_host_blocks"] == stats["num_host_blocks"], stats
    assert stats["num_swapped"] == 0 and not llm.engine.kv_cache.host_tables


@pytest.fixture(scope="module")
def unpressured():
    llm = LLM(dtype="float32", seed=0, num_kv_blocks=1024, enable_prefix_caching=False)
    return _run(llm)


def _pressured(mode: str, num_host_blocks: int = 256) -> LLM:
    return LLM(
        dtype="float32",
        seed=0,
        num_kv_blocks=28,
        max_num_batched_tokens=64,
        preemption_mode=mode,
        num_host_kv_blocks=num_host_blocks,
    )


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_groups_beams_and_singles_under_pressure_equal_an_unpressured_run(mode, unpressured):
    llm = _pressured(mode)
    got = _run(llm)
    assert got == unpressured
    stats = llm.stats()
    assert stats["num_preemptions"] > 0, stats
    if mode == "swap":
        assert stats["num_swapped_out_blocks"] > 0 and stats["num_preemptions_recompute"] == 0, stats
        assert stats["num_swapped_in_blocks"] == stats["num_swapped_out_blocks"]
    elif mode == "recompute":
        assert stats["num_swapped_out_blocks"] == 0 and stats["num_preemptions_swap"] == 0, stats
    else:  # groups (n > 1, beams) are always swapped in auto mode
        assert stats["num_preemptions_swap"] > 0, stats
    _assert_pools_free(llm)


def test_host_pool_too_small_falls_back_to_recompute(unpressured):
    llm = _pressured("swap", num_host_blocks=2)
    assert _run(llm) == unpressured
    stats = llm.stats()
    assert stats["num_preemptions_recompute"] > 0, stats
    _assert_pools_free(llm)


def _gather(kv: torch.Tensor, table: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """A sequence's K/V for its first ``num_tokens`` positions: [layer, k_or_v, token, head, dim]."""
    blocks = torch.tensor(table[: -(-num_tokens // block_size)])
    picked = kv[:, :, blocks]
    return picked.reshape(picked.shape[0], 2, -1, *picked.shape[-2:])[:, :, :num_tokens].clone()


def test_swap_restores_the_exact_kv_contents():
    llm = _pressured("swap")
    engine = llm.engine
    bs = engine.kv_cache.block_size
    requests = [engine.add_request(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS, strict=True))]
    before_swap: dict[int, tuple[int, torch.Tensor]] = {}  # seq_id -> (tokens, K/V) as it was swapped out
    checked = 0
    while engine.has_unfinished_requests():
        live = [(r, s) for r in requests if r.status is RequestStatus.RUNNING for s in r.unfinished_seqs]
        snapshot = {
            s.seq_id: (
                s.num_computed_tokens,
                _gather(engine.cache.kv, engine.kv_cache.block_table(s.seq_id), s.num_computed_tokens, bs),
            )
            for _, s in live
            if s.num_computed_tokens
        }
        status_before = {id(r): r.status for r in requests}
        engine.step()
        for request in requests:
            if status_before[id(request)] is RequestStatus.RUNNING and request.status is RequestStatus.SWAPPED:
                for seq in request.unfinished_seqs:
                    before_swap[seq.seq_id] = snapshot[seq.seq_id]
                    assert seq.num_computed_tokens == snapshot[seq.seq_id][0], "swapping keeps the computed tokens"
            if status_before[id(request)] is RequestStatus.SWAPPED and request.status is RequestStatus.RUNNING:
                for seq in request.unfinished_seqs:
                    tokens, kv = before_swap.pop(seq.seq_id)
                    table = engine.kv_cache.block_table(seq.seq_id)
                    assert torch.equal(_gather(engine.cache.kv, table, tokens, bs), kv)
                    checked += 1
    assert checked > 0, "no sequence was swapped out and back in"
    assert llm.stats()["num_swapped_out_blocks"] > 0
    _assert_pools_free(llm)


def _steps_until_first_token(policy: str) -> tuple[int, dict]:
    llm = LLM(dtype="float32", seed=0, num_kv_blocks=256, max_num_seqs=2, scheduling_policy=policy)
    engine = llm.engine
    low = 5 if policy == "priority" else 0
    for i in range(6):
        engine.add_request(
            f"bg{i}",
            {"prompt_token_ids": _unique_prompt(700 + i, 24)},
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            priority=low,
        )
    for _ in range(3):
        engine.step()
    urgent = engine.add_request(
        "urgent",
        {"prompt_token_ids": _unique_prompt(799, 24)},
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        priority=0,
    )
    steps = 0
    outputs = {}
    while urgent.first_token_time is None:
        for output in engine.step():
            outputs[output.request_id] = output
        steps += 1
    outputs.update(_finish(engine))
    assert all(outputs[f"bg{i}"].finished for i in range(6)), "the low-priority work finishes too"
    _assert_pools_free(llm)
    return steps, {rid: out.outputs[0].token_ids for rid, out in outputs.items()}


def test_an_urgent_request_gets_its_first_token_after_fewer_steps_than_under_fcfs():
    fcfs_steps, fcfs_out = _steps_until_first_token("fcfs")
    priority_steps, priority_out = _steps_until_first_token("priority")
    assert priority_steps == 1 and fcfs_steps > 20, (priority_steps, fcfs_steps)
    assert priority_out == fcfs_out, "preempting for priority does not change anyone's output"


def test_priority_is_refused_without_the_priority_policy(llm_fp32):
    with pytest.raises(ValueError, match="scheduling_policy"):
        llm_fp32.generate(["hi"], SamplingParams(max_tokens=2), priority=[1], use_tqdm=False)
    with pytest.raises(ValueError, match="priority"):
        llm_fp32.generate(["hi", "ho"], SamplingParams(max_tokens=2), priority=[0], use_tqdm=False)
    stats = llm_fp32.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


# -- abort from any state (tiny model: many steps) --------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    llm = LLM(
        model=tiny_llama_dir,
        dtype="float32",
        seed=0,
        block_size=4,
        num_kv_blocks=24,
        num_host_kv_blocks=24,
        max_num_batched_tokens=24,
        scheduling_policy="priority",
        priority_aging_steps=8,
    )
    return llm.engine


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 20), st.sampled_from([1, 1, 2, 3]), st.integers(0, 2)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, mode=st.sampled_from(["swap", "recompute", "auto"]))
def test_abort_in_any_state_leaves_no_block_held(tiny_engine, ops, mode):
    import dataclasses

    engine = tiny_engine
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, preemption_mode=mode)
    ids: list[str] = []
    aborted_states: set[RequestStatus] = set()
    for op in ops:
        if op[0] == "add":
            _, length, n, priority = op
            rid = uuid.uuid4().hex
            engine.add_request(
                rid,
                {"prompt_token_ids": _unique_prompt(len(ids), length)},
                SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
                priority=priority,
            )
            ids.append(rid)
        elif op[0] == "step":
            for _ in range(op[1]):
                engine.step()
        elif ids:
            rid = ids[op[1] % len(ids)]
            request = engine.requests.get(rid)
            if request is not None:
                aborted_states.add(request.status)
            output = engine.abort(rid)
            if request is not None:
                assert output is not None and output.finished
                assert all(s.seq_id not in engine.kv_cache.block_tables for s in request.seqs)
                assert all(s.seq_id not in engine.kv_cache.host_tables for s in request.seqs)
    for rid in ids:
        engine.abort(rid)
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_free_host_blocks"] == stats["num_host_blocks"], stats
    assert engine.kv_cache.pool.ref_counts == [0] * stats["num_kv_blocks"]
    assert engine.kv_cache.host_pool.ref_counts == [0] * stats["num_host_blocks"]


def test_abort_while_swapped_and_mid_prefill(tiny_engine):
    engine = tiny_engine
    import dataclasses

    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, preemption_mode="swap")
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=20, ignore_eos=True)
    rids = [f"s{i}" for i in range(4)]
    for i, rid in enumerate(rids):
        engine.add_request(rid, {"prompt_token_ids": _unique_prompt(900 + i, 10)}, params)
    for _ in range(60):
        engine.step()
        if engine.scheduler.swapped:
            break
    swapped = engine.scheduler.swapped[0]
    assert engine.stats()["num_free_host_blocks"] < engine.stats()["num_host_blocks"]
    engine.abort(swapped.request_id)
    assert swapped.status is RequestStatus.FINISHED
    assert all(s.seq_id not in engine.kv_cache.host_tables for s in swapped.seqs)
    for rid in rids:
        engine.abort(rid)
    long = engine.add_request("long", {"prompt_token_ids": _unique_prompt(999, 60)}, SamplingParams(max_tokens=2))
    engine.step()
    assert long.status is RequestStatus.RUNNING and 0 < long.seqs[0].num_computed_tokens < 60
    engine.abort("long")
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_free_host_blocks"] == stats["num_host_blocks"], stats
