"""Incremental detokenization with the default model's real (byte-level BPE) tokenizer.

Feeding output tokens one at a time must build exactly ``tokenizer.decode(output_ids)``, never
emit U+FFFD for a character whose UTF-8 bytes are split across tokens, and never take back text
it already emitted.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quire.engine.detokenizer import Detokenizer

pytestmark = pytest.mark.slow  # loads transformers and the real tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="session")
def real_tokenizer():
    from quire.models.loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(
    tok, prompt_ids: list[int], output_ids: list[int], skip_special_tokens: bool = True, literal_fffd: bool = False
) -> list[str]:
    """Run the detokenizer the way the engine does; returns the decoded text after every token."""
    token_ids = list(prompt_ids)
    detok = Detokenizer(tok)
    state = detok.start(len(prompt_ids))
    texts = []
    for i, token in enumerate(output_ids):
        before = state.text
        token_ids.append(token)
        new = detok.update(state, token_ids, skip_special_tokens, final=i == len(output_ids) - 1)
        assert state.text == before + new, "update must return exactly what it appended"
        if not literal_fffd:
            assert REPLACEMENT not in new, f"emitted U+FFFD after token {token}"
        texts.append(state.text)
    return texts


def check_stream(tok, prompt_ids, output_ids, skip_special_tokens=True, literal_fffd=False) -> list[str]:
    texts = stream(tok, prompt_ids, output_ids, skip_special_tokens, literal_fffd)
    expected = tok.decode(output_ids, skip_special_tokens=skip_special_tokens)
    final = texts[-1] if texts else ""
    assert final == expected
    for text in texts:
        assert expected.startswith(text), "text once emitted must never change"
    return texts


PROMPT = "The quick brown fox said:"

CASES = {
    "plain_english": " Hello, world! This is a perfectly ordinary English sentence.",
    "emoji": " Party time 🎉🥳 with family 👨‍👩‍👧‍👦 and a thumbs up 👍🏽!",
    "cjk": " 日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "accents": " Crème brûlée, façade, naïve, Ångström, São Paulo, Dvořák, Łódź.",
    "mixed": "Ünïcödé 😀 漢字 ok — “quotes” … ½ € ∑ 𝔘𝔫𝔦",
    "leading_spaces": "   three leading spaces, then  two, then one",
    "newlines": "\nline one\n\nline three\r\n\tindented\n",
    "code": "def f(x):\n    return x ** 2  # squared\n",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_incremental_text_equals_full_decode(real_tokenizer, name):
    tok = real_tokenizer
    check_stream(tok, encode(tok, PROMPT), encode(tok, CASES[name]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_incremental_text_equals_full_decode_without_prompt(real_tokenizer, name):
    tok = real_tokenizer
    check_stream(tok, [], encode(tok, CASES[name]))


@pytest.mark.parametrize("name", ["emoji", "cjk", "mixed"])
def test_split_multibyte_characters_are_held_back_not_replaced(real_tokenizer, name):
    tok = real_tokenizer
    output_ids = encode(tok, CASES[name])
    per_token = [tok.decode([t]) for t in output_ids]
    # The premise: some characters really are split across byte-level tokens.
    assert any(REPLACEMENT in piece for piece in per_token), "expected split UTF-8 in this text"
    texts = check_stream(tok, encode(tok, PROMPT), output_ids)
    naive = ["".join(per_token[: i + 1]) for i in range(len(per_token))]
    held_back = [i for i in range(len(texts)) if len(texts[i]) < len(naive[i])]
    assert held_back, "at some step the incremental text must be shorter than the naive per-token decode"
    assert all(REPLACEMENT not in text for text in texts)


def test_four_byte_emoji_split_over_tokens_appears_in_one_piece(real_tokenizer):
    tok = real_tokenizer
    output_ids = encode(tok, " 😀")
    assert len(output_ids) >= 2, "the emoji should take more than one token"
    texts = check_stream(tok, encode(tok, "Smile:"), output_ids)
    assert texts[:-1] == [""] * (len(texts) - 1), "nothing is emitted until the character is complete"
    assert texts[-1] == " 😀"


def test_leading_space_of_the_first_output_token_is_kept(real_tokenizer):
    tok = real_tokenizer
    output_ids = encode(tok, " Paris")
    texts = check_stream(tok, encode(tok, "The capital of France is"), output_ids)
    assert texts[-1] == " Paris"


CHAT_PROMPT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_OUTPUTS = [
    "Hi there!<|im_end|>",
    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nagain",
    "a<|im_end|><|im_end|><|im_end|><|im_end|><|im_end|><|im_end|><|im_end|>b",
    "<|endoftext|>",
    "😀<|im_end|>",
]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", SPECIAL_OUTPUTS)
def test_special_tokens(real_tokenizer, text, skip_special_tokens):
    tok = real_tokenizer
    output_ids = encode(tok, text)
    special = set(tok.all_special_ids)
    assert special & set(output_ids), "the premise: this output contains special tokens"
    texts = check_stream(tok, encode(tok, CHAT_PROMPT), output_ids, skip_special_tokens)
    markers = [t for t in tok.all_special_tokens if t in texts[-1]]
    if skip_special_tokens:
        assert not markers
    else:
        assert markers


def test_skip_special_tokens_flag_makes_a_difference(real_tokenizer):
    tok = real_tokenizer
    output_ids = encode(tok, "Done.<|im_end|>")
    shown = stream(tok, encode(tok, CHAT_PROMPT), output_ids, skip_special_tokens=False)[-1]
    hidden = stream(tok, encode(tok, CHAT_PROMPT), output_ids, skip_special_tokens=True)[-1]
    assert shown == "Done.<|im_end|>"
    assert hidden == "Done."


def test_update_upto_leaves_later_tokens_for_later(real_tokenizer):
    """The engine decodes up to a stop token (``upto``), leaving it out of the text."""
    tok = real_tokenizer
    prompt = encode(tok, PROMPT)
    output_ids = encode(tok, " stop here please")
    token_ids = prompt + output_ids
    detok = Detokenizer(tok)
    state = detok.start(len(prompt))
    text = detok.update(state, token_ids, True, upto=len(token_ids) - 1)
    assert text == tok.decode(output_ids[:-1])
    assert state.text == text
    assert detok.update(state, token_ids, True, upto=len(token_ids) - 1) == ""
    assert detok.update(state, token_ids, True) == tok.decode(output_ids)[len(text) :]
    assert state.text == tok.decode(output_ids)


# Random text: any Unicode except surrogates (not encodable) and U+FFFD itself (a text that *ends* in
# U+FFFD is indistinguishable from an incomplete character, see the xfail test below).
# Planes 4-16 mostly fail to round-trip through this vocabulary (see round_trips), so stay below them.
_ANY_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters=REPLACEMENT, max_codepoint=0x3FFFF)
random_text = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=0x7F),  # ASCII, including spaces and control characters
        st.characters(min_codepoint=0x80, max_codepoint=0x7FF),  # 2-byte UTF-8: accents, Greek, Cyrillic...
        st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF),  # 3-byte: CJK
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # 4-byte: emoji
        _ANY_CHAR,
    ),
    min_size=1,
    max_size=12,
)


def round_trips(tok, text: str) -> bool:
    # This GGUF vocabulary has no token for a few raw bytes (0xF1, for characters in planes 4-7), so such
    # text encodes to broken UTF-8 that decodes to U+FFFD; that is the tokenizer, not the detokenizer.
    return tok.decode(encode(tok, text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=random_text | st.just(""), output=random_text)
def test_random_unicode_text(real_tokenizer, prompt, output):
    tok = real_tokenizer
    assume(round_trips(tok, prompt) and round_trips(tok, output))
    output_ids = encode(tok, output)
    texts = check_stream(tok, encode(tok, prompt), output_ids)
    assert texts[-1] == output


def test_a_literal_replacement_character_as_the_last_token_is_emitted(real_tokenizer):
    tok = real_tokenizer
    output_ids = encode(tok, "x" + REPLACEMENT)
    assert tok.decode(output_ids[-1:]) == REPLACEMENT
    texts = stream(tok, encode(tok, PROMPT), output_ids, literal_fffd=True)
    assert texts[-1] == "x" + REPLACEMENT


def test_a_literal_replacement_character_followed_by_text_is_emitted(real_tokenizer):
    tok = real_tokenizer
    output_ids = encode(tok, "x" + REPLACEMENT + " ok")
    texts = check_stream(tok, encode(tok, PROMPT), output_ids, literal_fffd=True)
    assert texts[-1] == "x" + REPLACEMENT + " ok"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    output=st.lists(st.sampled_from(["a", " b", "é", "😀", "日", "<|im_end|>", "\n", "  "]), min_size=1, max_size=10)
)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_mixes_with_special_tokens(real_tokenizer, output, skip_special_tokens):
    tok = real_tokenizer
    output_ids = encode(tok, "".join(output))
    check_stream(tok, encode(tok, CHAT_PROMPT), output_ids, skip_special_tokens)
