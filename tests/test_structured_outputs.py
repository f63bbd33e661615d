"""Structured outputs (xgrammar) on the real default model, through ``LLM``: JSON schemas, choice,
regex and EBNF; forks, preemption, abort; a guided row never changes an unguided one."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from quire import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

SCHEMAS = [
    (
        "a person",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "a colour and whether you like it",
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}, "liked": {"type": "boolean"}},
            "required": ["colour", "liked"],
            "additionalProperties": False,
        },
    ),
    (
        "up to three short tags",
        {"type": "array", "items": {"type": "string", "pattern": "^[a-z-]{1,12}$"}, "maxItems": 3},
    ),
    (
        "a point",
        {
            "type": "object",
            "properties": {
                "x": {"type": "number", "minimum": -100, "maximum": 100},
                "y": {"type": "number", "minimum": -100, "maximum": 100},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    ),
    (
        "a book",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "pattern": "^[A-Za-z ,'-]{1,20}$"},
                "author": {
                    "type": "object",
                    "properties": {
                        "first": {"type": "string", "pattern": "^[A-Za-z.'-]{1,10}$"},
                        "last": {"type": "string", "pattern": "^[A-Za-z.'-]{1,10}$"},
                    },
                    "required": ["first", "last"],
                    "additionalProperties": False,
                },
                "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
                "genres": {
                    "type": "array",
                    "items": {"enum": ["fiction", "poetry", "science", "history"]},
                    "maxItems": 2,
                },
            },
            "required": ["title", "author", "year", "genres"],
            "additionalProperties": False,
        },
    ),
]


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def guided(**constraint) -> StructuredOutputsParams:
    return StructuredOutputsParams(**constraint)


def generate(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def assert_clean(llm) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_guided_seqs"] == 0, stats
    assert not llm.engine.requests


def test_fifty_seeded_sampled_requests_validate_against_their_schemas(llm_fp32, tokenizer):
    prompts, params, schemas = [], [], []
    for i, (what, schema) in enumerate(SCHEMAS):
        for s in range(10):
            prompts.append(chat_prompt(tokenizer, f"Answer in JSON: {what}."))
            params.append(
                SamplingParams(
                    temperature=1.0, seed=100 * i + s, max_tokens=80, structured_outputs=guided(json=schema)
                )
            )
            schemas.append(schema)
    outputs = generate(llm_fp32, prompts, params)  # one batch of 50
    assert len(outputs) == 50
    for output, schema in zip(outputs, schemas, strict=True):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), schema)
    assert_clean(llm_fp32)


def test_choice_regex_grammar_and_json_object(llm_fp32, tokenizer):
    choices = ["positive", "negative", "neutral"]
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    date = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    prompts = [
        chat_prompt(tokenizer, q)
        for q in ("How was the film?", "Give a phone number.", "Pick a date.", "Is water wet?", "Describe a cat.")
    ]
    params = [
        SamplingParams(n=4, temperature=1.2, seed=1, max_tokens=8, structured_outputs=guided(choice=choices)),
        SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=24, structured_outputs=guided(regex=phone)),
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=24, structured_outputs=guided(regex=date)),
        SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=12, structured_outputs=guided(grammar=grammar)),
        SamplingParams(
            n=2, best_of=3, temperature=0.9, seed=5, max_tokens=60, structured_outputs=guided(json_object=True)
        ),
    ]
    out = generate(llm_fp32, prompts, params)
    assert all(c.text in choices for c in out[0].outputs), out[0].outputs
    assert all(re.fullmatch(phone, c.text) for c in out[1].outputs), out[1].outputs
    assert all(re.fullmatch(date, c.text) for c in out[2].outputs), out[2].outputs
    assert all(re.fullmatch(r"The answer is (yes|no)\.", c.text) for c in out[3].outputs), out[3].outputs
    assert len(out[4].outputs) == 2
    for completion in out[4].outputs:
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict), completion.text
        else:  # the length limit: an unfinished object, but an object so far
            assert completion.finish_reason == "length" and completion.text.startswith("{")
    assert_clean(llm_fp32)


def test_unguided_rows_get_the_same_tokens_beside_guided_ones(llm_fp32, tokenizer):
    plain_prompts = ["The capital of France is", "def fibonacci(n):", chat_prompt(tokenizer, "Tell me a joke.")]
    plain = [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.8, seed=9, max_tokens=24),
        SamplingParams(temperature=1.0, seed=10, max_tokens=24, logprobs=2),
    ]
    alone = generate(llm_fp32, plain_prompts, plain)
    guided_prompts = [chat_prompt(tokenizer, "Answer in JSON: a person."), chat_prompt(tokenizer, "Yes or no?")]
    guided_params = [
        SamplingParams(temperature=0.7, seed=11, max_tokens=40, structured_outputs=guided(json=SCHEMAS[0][1])),
        SamplingParams(temperature=0, max_tokens=4, structured_outputs=guided(choice=["yes", "no"])),
    ]
    mixed = generate(
        llm_fp32, guided_prompts[:1] + plain_prompts + guided_prompts[1:], guided_params[:1] + plain + guided_params[1:]
    )
    for a, b in zip(alone, mixed[1:4], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
    assert mixed[4].outputs[0].text in ("yes", "no")
    assert_clean(llm_fp32)


def test_a_grammar_that_cannot_finish_stops_at_length_with_the_text_so_far(llm_fp32, tokenizer):
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]}
    params = SamplingParams(temperature=0, max_tokens=6, structured_outputs=guided(json=schema))
    completion = generate(llm_fp32, [chat_prompt(tokenizer, "A story in JSON.")], params)[0].outputs[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 6
    assert completion.text.startswith('{"story": "'), completion.text
    assert_clean(llm_fp32)


@pytest.mark.parametrize(
    ("field", "constraint"),
    [
        ("structured_outputs.json", {"json": {"type": "no-such-type"}}),
        ("structured_outputs.json", {"json": "{not json"}),
        ("structured_outputs.regex", {"regex": "(unclosed"}),
        ("structured_outputs.grammar", {"grammar": "root ::= "}),
        ("structured_outputs.choice", {"choice": []}),
        ("structured_outputs", {"regex": "a", "choice": ["a"]}),
    ],
)
def test_bad_constraints_are_value_errors_naming_the_field(llm_fp32, field, constraint):
    with pytest.raises(ValueError, match=re.escape(field)):
        generate(
            llm_fp32, ["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(**constraint))
        )
    assert_clean(llm_fp32)


def test_abort_drops_the_grammar_state(llm_fp32, tokenizer):
    engine = llm_fp32.engine
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=50, structured_outputs=guided(json=SCHEMAS[4][1]))
    engine.add_request("guided-abort", chat_prompt(tokenizer, "A book in JSON."), params)
    for _ in range(3):
        engine.step()
    assert llm_fp32.stats()["num_guided_seqs"] == 2
    engine.abort_request("guided-abort")
    assert_clean(llm_fp32)


def _pressure_workload(tokenizer):
    rng = random.Random(5)
    filler = " ".join(rng.choice(["red", "blue", "green", "tall", "small", "quick"]) for _ in range(30))
    prompts = [chat_prompt(tokenizer, f"{filler} ({i}). Answer in JSON: {SCHEMAS[i % 5][0]}.") for i in range(6)]
    words = guided(regex=r"[a-z]{3,8}( [a-z]{3,8}){7,9}\.")
    params = [
        SamplingParams(temperature=0, max_tokens=32, structured_outputs=guided(json=SCHEMAS[4][1])),
        SamplingParams(n=2, temperature=1.0, seed=21, max_tokens=32, structured_outputs=guided(json=SCHEMAS[0][1])),
        SamplingParams(temperature=0.8, seed=22, max_tokens=32, structured_outputs=words),
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=23, max_tokens=32, structured_outputs=words),
        SamplingParams(temperature=0.9, seed=24, max_tokens=32, structured_outputs=guided(json=SCHEMAS[2][1])),
    ]
    return prompts, params


@pytest.fixture(scope="module")
def unpressured(llm_fp32, tokenizer):
    prompts, params = _pressure_workload(tokenizer)
    return [[c.token_ids for c in o.outputs] for o in generate(llm_fp32, prompts, params)]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_grammar_state_survives_preemption(mode, unpressured, tokenizer):
    """A preempted sequence keeps its matcher: swapped or recomputed, it ends with the tokens of an unpressured run."""
    prompts, params = _pressure_workload(tokenizer)
    pressured = LLM(dtype="float32", seed=0, num_kv_blocks=18, max_num_batched_tokens=128, preemption_mode=mode)
    got = [[c.token_ids for c in o.outputs] for o in generate(pressured, prompts, params)]
    assert got == unpressured
    assert pressured.stats()[f"num_preemptions_{mode}"] > 0, pressured.stats()
    assert_clean(pressured)


def test_beam_search_beams_follow_the_grammar(llm_fp32, tokenizer):
    from quire import BeamSearchParams

    schema = SCHEMAS[1][1]
    params = BeamSearchParams(beam_width=3, max_tokens=30, structured_outputs=guided(json=schema))
    outputs = llm_fp32.beam_search([{"prompt": chat_prompt(tokenizer, "Answer in JSON: a colour.")}], params)
    sequences = outputs[0].sequences
    assert len(sequences) == 3
    assert len({tuple(seq.tokens) for seq in sequences}) == 3
    for seq in sequences:
        assert seq.finish_reason == "stop", seq
        jsonschema.validate(json.loads(seq.output_text), schema)
    assert_clean(llm_fp32)
