"""Block sharing on the real model: parallel sampling, copy-on-write, prefix caching, beams under pressure."""

from __future__ import annotations

import random

import pytest
import torch

from quire import LLM, BeamSearchParams, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm_no_cache():
    return LLM(dtype="float32", seed=0, enable_prefix_caching=False, num_kv_blocks=2048)


def _unique_prompt(seed: int, length: int) -> list[int]:
    """Token ids no other test uses, so nothing is in the prefix cache already."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 20000) for _ in range(length)]


def _run_until(engine, predicate, limit: int = 100) -> None:
    for _ in range(limit):
        if predicate():
            return
        engine.step()
    raise AssertionError("condition never reached")


def _finish(engine):
    """Step until idle; returns the last output of every request seen."""
    last = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            last[output.request_id] = output
    return last


def _texts(outputs) -> list[list[str]]:
    return [[o.text for o in out.outputs] for out in outputs]


def test_n4_holds_the_prompt_blocks_once(llm_fp32):
    engine, kv = llm_fp32.engine, llm_fp32.engine.kv_cache
    prompt = _unique_prompt(1, 100)
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    request = engine.add_request("n4-blocks", {"prompt_token_ids": prompt}, params)
    _run_until(engine, lambda: len(request.seqs) == 4)

    tables = [kv.block_table(s.seq_id) for s in request.seqs]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 7  # ceil(100 / 16), not 28
    assert [kv.pool.ref_counts[b] for b in tables[0]] == [4] * 7

    engine.step()  # every child writes token 100, into the shared partial block 6
    tables = [kv.block_table(s.seq_id) for s in request.seqs]
    assert all(t[:6] == tables[0][:6] for t in tables), "full prompt blocks stay shared"
    assert [kv.pool.ref_counts[b] for b in tables[0][:6]] == [4] * 6
    assert len({t[6] for t in tables}) == 4, "each child owns its last block after copy-on-write"
    assert len({b for t in tables for b in t}) == 10

    _finish(engine)
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], "fully free (or evictable)"


def test_copy_on_write_copies_only_the_partial_block_and_each_child_reads_its_own(llm_fp32):
    engine, kv, cache = llm_fp32.engine, llm_fp32.engine.kv_cache, llm_fp32.engine.cache
    prompt = _unique_prompt(2, 100)  # 6 full blocks + 4 tokens in block 6
    params = SamplingParams(n=2, temperature=1.5, seed=21, max_tokens=4, ignore_eos=True)
    request = engine.add_request("cow", {"prompt_token_ids": prompt}, params)
    _run_until(engine, lambda: len(request.seqs) == 2)
    shared = list(kv.block_table(request.seqs[0].seq_id))
    before = cache.kv[:, :, shared[6], :4].clone()
    engine.step()
    a, b = (kv.block_table(s.seq_id) for s in request.seqs)
    assert a[:6] == b[:6] == shared[:6], "the shared prefix is not copied"
    assert a[6] != b[6] and shared[6] in (a[6], b[6])
    # The copy starts as the original: the 4 prompt slots are identical in every layer, K and V.
    assert torch.equal(cache.kv[:, :, a[6], :4], before) and torch.equal(cache.kv[:, :, b[6], :4], before)
    first_tokens = [s.token_ids[100] for s in request.seqs]
    assert first_tokens[0] != first_tokens[1], "pick a seed whose children diverge at once"
    assert not torch.equal(cache.kv[:, :, a[6], 4], cache.kv[:, :, b[6], 4]), "each wrote its own token's K/V"
    final = _finish(engine)["cow"]
    # Each child read its own K/V: its text equals the same seeded sequence run alone.
    for i, out in enumerate(final.outputs):
        alone = llm_fp32.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(temperature=1.5, seed=21 + i, max_tokens=4, ignore_eos=True),
            use_tqdm=False,
        )[0]
        assert out.token_ids == alone.outputs[0].token_ids


def test_n_and_best_of_equal_the_seeded_sequences_run_one_by_one(llm_fp32):
    prompts = ["The capital of France is", "Once upon a time, there was a"]
    sampled = {"temperature": 0.9, "max_tokens": 8, "top_p": 0.95}
    together = llm_fp32.generate(prompts, SamplingParams(n=3, seed=11, **sampled), use_tqdm=False)
    best = llm_fp32.generate(prompts, SamplingParams(n=2, best_of=4, seed=11, **sampled), use_tqdm=False)
    for prompt, group, chosen in zip(prompts, together, best, strict=True):
        alone = [
            llm_fp32.generate([prompt], SamplingParams(seed=11 + i, **sampled), use_tqdm=False)[0].outputs[0]
            for i in range(4)
        ]
        assert [o.index for o in group.outputs] == [0, 1, 2]
        assert [o.token_ids for o in group.outputs] == [a.token_ids for a in alone[:3]]
        ranked = sorted(alone, key=lambda o: -o.cumulative_logprob)[:2]
        assert [o.token_ids for o in chosen.outputs] == [o.token_ids for o in ranked]
        assert [o.index for o in chosen.outputs] == [0, 1]
        assert chosen.outputs[0].cumulative_logprob >= chosen.outputs[1].cumulative_logprob
    stats = llm_fp32.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_prefix_cache_32_requests_sharing_a_400_token_system_prompt(llm_fp32, llm_no_cache):
    system = _unique_prompt(3, 400)
    prompts = [{"prompt_token_ids": system + _unique_prompt(100 + i, 12)} for i in range(32)]
    params = [
        SamplingParams(temperature=0, max_tokens=2)
        if i % 2 == 0
        else SamplingParams(temperature=0.8, seed=i, max_tokens=2)
        for i in range(32)
    ]

    def run(llm):
        before = llm.stats()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        after = llm.stats()
        delta = {k: after[k] - before[k] for k in ("num_prompt_tokens_computed", "num_prefix_cache_hits")}
        return outputs, delta, after

    llm_fp32.reset_prefix_cache()
    cached, with_cache, stats = run(llm_fp32)
    uncached, without_cache, _ = run(llm_no_cache)
    assert _texts(cached) == _texts(uncached), "caching must not change greedy or seeded outputs"
    assert without_cache["num_prompt_tokens_computed"] == 32 * 412
    saved = 1 - with_cache["num_prompt_tokens_computed"] / without_cache["num_prompt_tokens_computed"]
    assert saved >= 0.9, with_cache
    # Hits count only reused tokens: what was not computed.
    assert with_cache["num_prefix_cache_hits"] == 32 * 412 - with_cache["num_prompt_tokens_computed"]
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]

    # Run again: now every prompt's full blocks are cached; still the same outputs.
    again, delta, _ = run(llm_fp32)
    assert _texts(again) == _texts(uncached)
    assert delta["num_prompt_tokens_computed"] == 32 * (412 - 400)  # 25 full blocks hit, 12 tokens computed

    llm_fp32.reset_prefix_cache()
    assert llm_fp32.stats()["num_cached_kv_blocks"] == 0


def test_groups_and_beams_under_preemption_equal_an_unconstrained_engine(llm_no_cache):
    """A small pool forces recompute preemption of groups and beams; the prefix cache serves readmissions."""
    small = LLM(dtype="float32", seed=0, num_kv_blocks=24, max_num_batched_tokens=64, preemption_mode="recompute")
    shared = _unique_prompt(4, 40)
    prompts = [{"prompt_token_ids": shared + _unique_prompt(200 + i, 5 + 7 * i)} for i in range(6)]
    params = [
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True),
        BeamSearchParams(beam_width=3, max_tokens=20, ignore_eos=True),
        SamplingParams(n=2, best_of=3, temperature=1.0, seed=6, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True),
        SamplingParams(n=4, temperature=1.0, seed=10, max_tokens=12, ignore_eos=True),
    ]
    engine = small.engine
    with pytest.raises(ValueError, match="KV blocks"):  # could never finish: 4 x 6 blocks > 24 if unshared
        engine.add_request("too-big", prompts[0], SamplingParams(n=4, max_tokens=100))
    requests = [engine.add_request(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    got = _finish(engine)
    assert requests[4].num_preemptions > 0 and sum(r.num_preemptions for r in requests[:4]) > 0
    stats = small.stats()
    assert stats["num_prefix_cache_hits"] > 0, stats
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    reference = llm_no_cache.engine
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        reference.add_request(f"p{i}", prompt, sp)
    expected = _finish(reference)
    for i in range(len(prompts)):
        assert [o.token_ids for o in got[f"p{i}"].outputs] == [o.token_ids for o in expected[f"p{i}"].outputs]


def test_beams_share_blocks_and_release_them(llm_fp32):
    engine, kv = llm_fp32.engine, llm_fp32.engine.kv_cache
    prompt = _unique_prompt(5, 40)
    request = engine.add_request(
        "beam-blocks", {"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=24, ignore_eos=True)
    )
    savings = []
    output = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            output = out
        tables = [kv.block_table(s.seq_id) for s in request.unfinished_seqs if kv.block_table(s.seq_id)]
        if len(tables) > 1:
            distinct = len({b for t in tables for b in t})
            savings.append(1 - distinct / sum(len(t) for t in tables))
            assert distinct == kv.pool.num_used, "dropped beams hold no blocks"
    assert savings and min(savings) > 0.3, savings
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert output is not None and output.finished and len(output.outputs) == 4
    scores = [o.score for o in output.outputs]
    assert scores == sorted(scores, reverse=True)
