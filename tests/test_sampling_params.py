"""SamplingParams: vLLM's defaults, and a ValueError naming the field for every invalid value."""

from __future__ import annotations

import re

import pytest

from quire.sampling_params import BeamSearchParams, SamplingParams


def names_field(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


INVALID = [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": -1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.0001}),
    ("top_p", {"top_p": -0.5}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": -100}),
    ("top_k", {"top_k": 2.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.01}),
    ("n", {"n": 0}),
    ("n", {"n": -1}),
    ("presence_penalty", {"presence_penalty": 2.01}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -3.0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("min_tokens", {"min_tokens": 17}),  # > the default max_tokens of 16
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("min_tokens", {"min_tokens": -1}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("stop", {"stop": ["ok", 3]}),
    ("stop", {"stop": [None]}),
    ("stop", {"stop": ""}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("seed", {"seed": 1.5}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={list(k.values())}" for f, k in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(field, kwargs):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert names_field(str(excinfo.value), field), str(excinfo.value)


@pytest.mark.parametrize("stop", [5, 2.5, object()], ids=["int", "float", "object"])
def test_non_string_stop_that_is_not_a_list_raises_value_error(stop):
    # Any non-string stop must be rejected as bad input (ValueError naming `stop`), not crash with a TypeError.
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(stop=stop)
    assert names_field(str(excinfo.value), "stop"), str(excinfo.value)


def test_non_list_stop_token_ids_raises_value_error():
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(stop_token_ids=5)
    assert names_field(str(excinfo.value), "stop_token_ids"), str(excinfo.value)


def test_n_and_best_of_are_validated_naming_the_field():
    assert SamplingParams(n=2).num_seqs == 2
    assert SamplingParams(n=2, best_of=5).num_seqs == 5
    with pytest.raises(ValueError, match=r"\bn\b"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(best_of=0)


def test_beam_search_params_are_validated_naming_the_field():
    assert BeamSearchParams(beam_width=4, max_tokens=8).length_penalty == 1.0
    for kwargs, name in [
        ({"beam_width": 0, "max_tokens": 8}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 8, "temperature": -1.0}, "temperature"),
    ]:
        with pytest.raises(ValueError, match=name):
            BeamSearchParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 2.0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": 50},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": 2.0},
        {"presence_penalty": -2.0},
        {"frequency_penalty": 2.0},
        {"frequency_penalty": -2.0},
        {"repetition_penalty": 1e-3},
        {"max_tokens": 1},
        {"max_tokens": None, "min_tokens": 100},
        {"min_tokens": 16},
        {"logprobs": 0},
        {"prompt_logprobs": 0},
        {"stop": ["a", "bc"]},
        {"stop": ("x",)},
        {"best_of": 1},
        {"seed": 0},
        {"stop_token_ids": [0, 5]},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.best_of is None
    assert p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k in (0, -1)  # both mean "off" in vLLM
    assert p.min_p == 0.0
    assert p.seed is None
    assert p.stop_strings == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.logprobs is None
    assert p.prompt_logprobs is None
    assert p.skip_special_tokens is True
    assert p.spaces_between_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert not p.greedy
    assert not p.uses_penalties


def test_top_k_minus_one_means_off_like_zero():
    assert SamplingParams(top_k=-1).top_k == SamplingParams(top_k=0).top_k == SamplingParams().top_k


def test_stop_string_becomes_a_one_element_list():
    p = SamplingParams(stop="###")
    assert p.stop_strings == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams(stop=("a",)).stop_strings == ["a"]
    assert SamplingParams(stop=None).stop_strings == []


def test_stop_list_is_copied():
    stops = ["a"]
    p = SamplingParams(stop=stops)
    stops.append("b")
    assert p.stop_strings == ["a"]


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert SamplingParams(frequency_penalty=-0.5).uses_penalties
