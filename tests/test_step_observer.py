"""The step observer seam: one ``StepRecord`` per ``LLMEngine.step``, consistent with what the step did."""

from __future__ import annotations

import dataclasses

import pytest

from quire import SamplingParams
from quire.engine.step_record import StepRecord

pytestmark = pytest.mark.slow


def test_step_records_add_up_to_the_tokens_served(llm_fp32):
    engine = llm_fp32.engine
    records: list[tuple[StepRecord, int]] = []

    def observer(record: StepRecord) -> None:  # called after the step: the engine's counters include it
        records.append((record, engine.stats()["num_steps"]))

    engine.add_step_observer(observer)
    try:
        before = engine.stats()
        greedy = llm_fp32.generate(
            ["Observers see every step of", "A list of colours: red,"],
            SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
            use_tqdm=False,
        )
        forked = llm_fp32.generate(  # two sequences forked from one prompt: two sampled rows at its last chunk
            ["Once upon a time"], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=5), use_tqdm=False
        )
        after = engine.stats()
        assert not engine.has_unfinished_requests() and engine.step() == []
    finally:
        engine.remove_step_observer(observer)

    *ran, (idle, _) = records
    assert idle.runner_output is None and idle.scheduler_output.is_empty
    assert idle.execute_s == idle.update_s == 0.0 <= idle.schedule_s
    assert all(r.runner_output is not None for r, _ in ran)
    assert len(ran) == after["num_steps"] - before["num_steps"]
    assert [steps for _, steps in ran] == list(range(before["num_steps"] + 1, after["num_steps"] + 1))
    for record, _ in ran:
        assert min(record.schedule_s, record.execute_s, record.update_s) >= 0.0
        scheduled = {id(e) for e in record.scheduler_output.scheduled}
        assert all(id(e) in scheduled for e in record.runner_output.sampled_seqs)  # rows come from this step
    with pytest.raises(dataclasses.FrozenInstanceError):
        ran[0][0].update_s = 1.0  # type: ignore[misc]

    outputs = greedy + forked
    completions = [c for o in outputs for c in o.outputs]
    generated = sum(len(c.token_ids) for c in completions)
    assert generated == 2 * 7 + sum(len(c.token_ids) for c in forked[0].outputs)
    assert sum(len(r.runner_output.sampled_seqs) for r, _ in ran) == generated  # one sampled row per new token
    assert generated == after["num_generated_tokens"] - before["num_generated_tokens"]
    # Every prompt token not found in the prefix cache runs once, and every generated token but the last of
    # its sequence runs as the next decode's input.
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    cached = after["num_prefix_cache_hits"] - before["num_prefix_cache_hits"]
    scheduled = sum(r.scheduler_output.num_batched_tokens for r, _ in ran)
    assert scheduled == prompt_tokens - cached + generated - len(completions)
    by_request: dict[str, int] = {}
    for record, _ in ran:
        for entry in record.scheduler_output.scheduled:
            by_request[entry.request.request_id] = by_request.get(entry.request.request_id, 0) + entry.num_new_tokens
    assert by_request.keys() == {o.request_id for o in outputs}
