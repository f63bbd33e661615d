"""A GGUF file's tokenizer is converted once and read back from the cache, the same tokenizer."""

from __future__ import annotations

import pytest

from quire.models.loader import load_tokenizer

TEXTS = ["Hello world, what is PagedAttention?", "naïve café — 東京 🙂", "  leading spaces\n\ttabs"]


@pytest.mark.slow
def test_the_cached_tokenizer_is_the_converted_one(default_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    converted = load_tokenizer(default_model_path)
    (saved,) = (tmp_path / "quire" / "tokenizers").iterdir()
    assert (saved / "converted-from.txt").exists()
    cached = load_tokenizer(default_model_path)
    for text in TEXTS:
        assert cached(text).input_ids == converted(text).input_ids
    ids = list(range(0, len(converted), 97))
    assert cached.decode(ids) == converted.decode(ids)
    chat = [{"role": "user", "content": "Hi!"}]
    assert cached.apply_chat_template(chat, add_generation_prompt=True) == converted.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (cached.bos_token_id, cached.eos_token_id, len(cached)) == (
        converted.bos_token_id, converted.eos_token_id, len(converted))
    assert cached.special_tokens_map == converted.special_tokens_map
