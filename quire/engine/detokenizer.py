"""Incremental detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

from quire.core.request import Sequence

# Tokens decoded together with the new ones, so merges across the boundary (spaces, bytes) come out right.
_CONTEXT_TOKENS = 5


class Detokenizer:
    """Appends to ``seq.output_text`` the text of tokens it has not decoded yet.

    Decodes a short window ``token_ids[prefix_offset:]`` and emits what it adds beyond the
    text of ``token_ids[prefix_offset:read_offset]``. A window ending in U+FFFD is an
    incomplete multi-byte character: nothing is emitted until the next token completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(0, seq.read_offset - _CONTEXT_TOKENS)

    def update(self, seq: Sequence, skip_special_tokens: bool, upto: int | None = None, final: bool = False) -> str:
        """Decode new tokens up to index ``upto`` (default: all); returns the text added.

        ``final`` (the sequence has ended) emits a trailing U+FFFD too: no token will complete it.
        """
        end = len(seq.token_ids) if upto is None else upto
        if end <= seq.read_offset:
            return ""
        ids = seq.token_ids
        decode = self.tokenizer.decode
        prefix = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip_special_tokens)
        full = decode(ids[seq.prefix_offset : end], skip_special_tokens=skip_special_tokens)
        if (full.endswith("\ufffd") and not final) or len(full) <= len(prefix):
            return ""
        new_text = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, end
        seq.output_text += new_text
        return new_text
