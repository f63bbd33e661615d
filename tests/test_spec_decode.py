"""Speculative decoding on the real default model: exact greedy output, rolled-back KV slots, composition.

The baseline is the session's ``llm_fp32`` (no speculation). Three small engines speculate: prompt
lookup (recompute preemption under a tight pool), the default model as its own draft (swap
preemption) and the tiny random Llama as draft. The acceptance rule itself is checked on a toy
distribution with a chi-square bound.
"""

from __future__ import annotations

import argparse
import json

import openai
import pytest
import torch
from server_utils import ServerThread, metric

from quire import LLM, SamplingParams
from quire.config import EngineArgs, SpeculativeConfig
from quire.core.kv_cache_manager import cdiv
from quire.engine.async_engine import AsyncLLMEngine
from quire.entrypoints.engine_args import engine_kwargs
from quire.entrypoints.openai.api_server import build_app
from quire.metrics import EngineMetrics, acceptance_rate
from quire.sampling.rejection_sampler import rejection_sample
from quire.spec_decode.ngram import find_ngram_drafts

pytestmark = pytest.mark.slow

# The kinds of prompts users send an inference server: edit or summarise a given text, extend
# code, reorder a list; and one open-ended prompt with little to look up.
CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)
"""
TEXT = (
    "The river town of Ashford grew up around a mill. In 1820 the mill burned down, and the townspeople "
    "rebuilt it in stone. The new mill ground wheat for forty years, until the railway brought cheaper "
    "flour from the cities. The mill then became a school, and later a museum about the town's history."
)
CONVERSATIONS = [
    [{"role": "user", "content": f"Rename the function variance to spread in this code and print it all:\n{CODE}"}],
    [{"role": "user", "content": f"Summarise this text in two sentences:\n{TEXT}"}],
    [{"role": "user", "content": "Sort this list alphabetically: pear, apple, fig, banana, cherry, grape, date."}],
    [{"role": "user", "content": "Tell me something surprising about octopuses."}],
]
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def _assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_free_host_blocks"] == stats["num_host_blocks"], stats
    assert not llm.engine.requests


class TableCheck:
    """Step observer: after every step each live sequence holds exactly the blocks its computed tokens fill.

    That is what one-token-at-a-time decoding leaves, so it holds only if every rejected or
    unused draft slot was given back.
    """

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
        self.steps = 0
        self.bad: list[tuple[int, int, int]] = []

    def __call__(self, record) -> None:
        self.steps += 1
        block_size = self.engine.config.cache.block_size
        for chunk in record.scheduler_output.scheduled:
            seq = chunk.seq
            if seq.is_finished or chunk.request.request_id not in self.engine.requests:
                continue
            held = len(self.engine.kv_cache.block_table(seq.seq_id))
            if held and held != cdiv(seq.num_computed_tokens, block_size):
                self.bad.append((seq.seq_id, seq.num_computed_tokens, held))


@pytest.fixture(scope="module")
def reference(llm_fp32):
    return _token_ids(llm_fp32.chat(CONVERSATIONS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def ngram_llm():
    """Prompt lookup with a pool too small for the whole batch: requests are preempted and recomputed."""
    return LLM(
        dtype="float32",
        seed=0,
        num_kv_blocks=16,
        preemption_mode="recompute",
        speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
    )


# -- the acceptance rule ---------------------------------------------------------------------------


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (cells with probability 0 must be empty)."""
    assert counts[probs == 0].sum() == 0, "a token the target never emits was emitted"
    expected = probs * counts.sum()
    keep = probs > 0
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2))


@pytest.mark.parametrize("proposal", ["point mass", "distribution"])
def test_rejection_sampling_emits_the_target_distribution(proposal):
    """First emitted token ~ p at position 0, whatever q proposed; the second ~ p at position 1 when reached."""
    p = torch.tensor([[0.05, 0.40, 0.25, 0.30, 0.0], [0.5, 0.1, 0.1, 0.1, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)  # far from p: many rejections
    generator = torch.Generator().manual_seed(7)
    first = torch.zeros(5, dtype=torch.float64)
    second = torch.zeros(5, dtype=torch.float64)
    accepted = 0
    trials = 20000
    for _ in range(trials):
        if proposal == "point mass":
            draft, draft_probs = 2, None
        else:
            draft = int(torch.multinomial(q[0], 1, generator=generator))
            draft_probs = q
        emitted = rejection_sample(p, [draft], draft_probs, generator)
        first[emitted[0]] += 1
        if len(emitted) == 2:
            accepted += 1
            second[emitted[1]] += 1
    assert _chi_square_p_value(first, p[0]) > 1e-3
    assert _chi_square_p_value(second, p[1]) > 1e-3
    # The acceptance rate is sum(min(p, q)): 0.25 for the point mass on token 2, 0.35 for q.
    proposed = torch.nn.functional.one_hot(torch.tensor(2), 5).double() if proposal == "point mass" else q[0]
    assert abs(accepted / trials - float(torch.minimum(p[0], proposed).sum())) < 0.02


def test_rejection_sampling_with_equal_distributions_accepts_everything():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafts = torch.multinomial(p[:2], 1, generator=generator).squeeze(1).tolist()
        assert rejection_sample(p, drafts, p[:2], generator)[:2] == drafts


def test_ngram_lookup_finds_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert find_ngram_drafts(tokens, 3, 3, 1) == [7, 8, 5]  # "2 3" last seen before 7 8 5
    assert find_ngram_drafts([4, 5, 6], 3, 3, 1) == []
    assert find_ngram_drafts([1, 2, 1, 2], 5, 2, 2) == [1, 2]
    assert find_ngram_drafts(tokens, 0, 3, 1) == []


# -- greedy exactness and composition (prompt lookup) ----------------------------------------------


def test_ngram_greedy_equals_plain_decoding_under_preemption(ngram_llm, reference):
    check = TableCheck(ngram_llm)
    ngram_llm.engine.add_step_observer(check)
    try:
        before = ngram_llm.stats()
        batched = _token_ids(ngram_llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False))
        after = ngram_llm.stats()
    finally:
        ngram_llm.engine.remove_step_observer(check)
    assert batched == reference
    assert after["num_preemptions_recompute"] > before["num_preemptions_recompute"], "the pool never ran short"
    assert after["num_accepted_tokens"] > before["num_accepted_tokens"]
    assert not check.bad, check.bad
    _assert_all_blocks_free(ngram_llm)


def test_ngram_greedy_alone_equals_batched(ngram_llm, reference):
    alone = _token_ids(ngram_llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False))
    assert alone == reference[:1]
    _assert_all_blocks_free(ngram_llm)


def test_ngram_with_prefix_cache_hits(ngram_llm, reference):
    """The same prompts again: their cached prefixes (registered only for accepted tokens) are reused."""
    ngram_llm.chat(CONVERSATIONS[1], GREEDY, use_tqdm=False)
    hits = ngram_llm.stats()["num_prefix_cache_hits"]
    again = _token_ids(ngram_llm.chat(CONVERSATIONS[1], GREEDY, use_tqdm=False))
    assert again == reference[1:2]
    assert ngram_llm.stats()["num_prefix_cache_hits"] > hits
    _assert_all_blocks_free(ngram_llm)


def test_ngram_n_greater_than_one(ngram_llm, reference):
    """Greedy n=2: both sequences are the plain greedy output; seeded n=2: reproducible alone and batched."""
    out = ngram_llm.chat(CONVERSATIONS[2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, n=2), use_tqdm=False)
    assert [c.token_ids for c in out[0].outputs] == reference[2] * 2
    seeded = SamplingParams(temperature=0.8, seed=11, n=2, max_tokens=24)
    alone = _token_ids(ngram_llm.chat(CONVERSATIONS[2], seeded, use_tqdm=False))
    batched = _token_ids(ngram_llm.chat(CONVERSATIONS[1:3], [GREEDY, seeded], use_tqdm=False))
    assert alone[0] == batched[1]
    assert batched[0] == reference[1]
    _assert_all_blocks_free(ngram_llm)


def test_ngram_logprobs_match_plain_decoding(ngram_llm, llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    plain = llm_fp32.chat(CONVERSATIONS[0], params, use_tqdm=False)[0].outputs[0]
    spec = ngram_llm.chat(CONVERSATIONS[0], params, use_tqdm=False)[0].outputs[0]
    assert spec.token_ids == plain.token_ids
    for a, b in zip(plain.logprobs, spec.logprobs, strict=True):
        assert a.keys() == b.keys()
        for token in a:
            assert abs(a[token].logprob - b[token].logprob) < 1e-4


# -- draft models ------------------------------------------------------------------------------------


def test_default_model_as_its_own_draft(default_model_path, reference):
    """Nearly every draft is accepted; swap preemption under a tight pool; output unchanged."""
    llm = LLM(
        dtype="float32",
        seed=0,
        num_kv_blocks=16,
        preemption_mode="swap",
        speculative_config={"model": default_model_path, "num_speculative_tokens": 3},
    )
    check = TableCheck(llm)
    llm.engine.add_step_observer(check)
    assert _token_ids(llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)) == reference
    stats = llm.stats()
    assert stats["num_preemptions_swap"] > 0, "the pool never ran short"
    rate = acceptance_rate(stats)
    assert rate is not None and rate > 0.9, stats
    assert not check.bad, check.bad
    _assert_all_blocks_free(llm)


def test_tiny_random_llama_as_draft(tiny_llama_dir, reference):
    """A random draft is almost never right: few drafts accepted, and the output is still the target's."""
    llm = LLM(dtype="float32", seed=0, num_kv_blocks=64, speculative_config={"model": tiny_llama_dir})
    assert _token_ids(llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)) == reference
    stats = llm.stats()
    rate = acceptance_rate(stats)
    assert stats["num_draft_tokens"] > 0 and rate is not None and rate < 0.5, stats
    _assert_all_blocks_free(llm)


# -- configuration and the server --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"method": "eagle"}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "draft_model"}, "model"),
        ({"method": "ngram", "lookahead": 3}, "unknown keys"),
        ("{not json", "JSON"),
    ],
)
def test_bad_speculative_config_is_a_clear_error(config, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(speculative_config=config).validate()


def _serve_parser() -> argparse.ArgumentParser:
    from quire.entrypoints.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_speculative_config_flag_is_json():
    args = _serve_parser().parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert args.speculative_config == SpeculativeConfig("ngram", 2)
    config = EngineArgs(**engine_kwargs(args)).create_config("m", 2048, "float32")
    assert config.speculative == SpeculativeConfig("ngram", 2)
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["--speculative-config", '{"method": "nope"}'])


def test_server_with_speculation(ngram_llm, reference):
    """The OpenAI server on a speculating engine: same greedy text, spec-decode counters on /metrics."""
    engine = AsyncLLMEngine(ngram_llm.engine, metrics=EngineMetrics("smol"), log_stats_interval=None)
    app = build_app(engine, served_model_names=["smol"])
    tokenizer = ngram_llm.get_tokenizer()
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smol", messages=CONVERSATIONS[0], temperature=0, max_tokens=MAX_TOKENS
        )
        expected = tokenizer.decode(reference[0][0], skip_special_tokens=True)
        assert reply.choices[0].message.content == expected
        drafted = metric(server.url, "quire:spec_decode_num_draft_tokens_total")
        accepted = metric(server.url, "quire:spec_decode_num_accepted_tokens_total")
        assert drafted >= accepted > 0
        assert metric(server.url, "quire:spec_decode_num_drafts_total") > 0
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smol", messages=CONVERSATIONS[0], max_tokens=-1)
    _assert_all_blocks_free(ngram_llm)
    assert json.loads(json.dumps(ngram_llm.stats()))["num_draft_tokens"] >= drafted
