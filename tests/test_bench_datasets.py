"""ShareGPT-like and Alpaca-like traces: published means, vLLM's filter, real tokens, reproducibility."""

from __future__ import annotations

import math
import statistics

import pytest

from quire.bench.datasets import DATASETS, make_trace, sample_lengths, word_token_stream


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_means_within_5_percent_of_the_published_ones(dataset):
    model = DATASETS[dataset]
    pairs = sample_lengths(dataset, 20_000, seed=0)
    prompt_mean = statistics.fmean(p for p, _ in pairs)
    output_mean = statistics.fmean(o for _, o in pairs)
    assert prompt_mean == pytest.approx(model.target_prompt_mean, rel=0.05)
    assert output_mean == pytest.approx(model.target_output_mean, rel=0.05)


def test_sharegpt_is_long_tailed_and_filtered_like_vllm():
    pairs = sample_lengths("sharegpt", 20_000, seed=1)
    prompts = sorted(p for p, _ in pairs)
    assert all(4 <= p <= 1024 and o >= 4 and p + o <= 2048 for p, o in pairs)
    median = prompts[len(prompts) // 2]
    assert median < 0.8 * statistics.fmean(prompts)  # right-skewed: the mean sits well above the median
    assert prompts[int(0.99 * len(prompts))] > 4 * median


def test_same_seed_same_trace_other_seed_other_trace():
    tokens = word_token_stream()
    a = make_trace("sharegpt-like", 50, tokens, request_rate=2.0, seed=3)
    b = make_trace("sharegpt-like", 50, tokens, request_rate=2.0, seed=3)
    c = make_trace("sharegpt-like", 50, tokens, request_rate=2.0, seed=4)
    assert a == b
    assert a != c


def test_poisson_arrivals_and_all_at_once():
    tokens = word_token_stream()
    trace = make_trace("alpaca", 4000, tokens, request_rate=30.0, seed=0)
    times = [r.arrival_time for r in trace]
    assert times == sorted(times)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 30, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 30, rel=0.1)  # exponential: sd = mean
    offline = make_trace("alpaca", 10, tokens, request_rate=math.inf, seed=0)
    assert all(r.arrival_time == 0.0 for r in offline)


def test_prompts_are_real_varied_tokens_and_respect_the_context():
    tokens = word_token_stream()
    trace = make_trace("sharegpt", 200, tokens, seed=0, max_total_len=256)
    assert all(r.total_len <= 256 for r in trace)
    for r in trace:
        if r.prompt_len >= 8:
            assert len(set(r.prompt_token_ids)) > 1  # not one repeated token
    starts = {r.prompt_token_ids[:4] for r in trace if r.prompt_len >= 4}
    assert len(starts) > 100  # prompts start at different places of the corpus
