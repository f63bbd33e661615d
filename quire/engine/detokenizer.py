"""Incremental detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

from dataclasses import dataclass

# Tokens decoded together with the new ones, so merges across the boundary (spaces, bytes) come out right.
_CONTEXT_TOKENS = 5


@dataclass
class DecodeState:
    """One sequence's text so far and where the detokenizer stands in its tokens.

    ``prefix_offset`` and ``read_offset`` index the sequence's ``token_ids``: the window
    ``[prefix_offset, read_offset)`` was decoded last and gives the context for the next tokens.
    """

    prefix_offset: int
    read_offset: int
    text: str = ""


class Detokenizer:
    """Appends to a ``DecodeState``'s text the text of tokens it has not decoded yet.

    Decodes a short window ``token_ids[prefix_offset:]`` and emits what it adds beyond the
    text of ``token_ids[prefix_offset:read_offset]``. A window ending in U+FFFD is an
    incomplete multi-byte character: nothing is emitted until the next token completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def start(num_prompt_tokens: int) -> DecodeState:
        """State for a sequence whose first ``num_prompt_tokens`` tokens (the prompt) are not output text."""
        return DecodeState(prefix_offset=max(0, num_prompt_tokens - _CONTEXT_TOKENS), read_offset=num_prompt_tokens)

    def update(
        self,
        state: DecodeState,
        token_ids: list[int],
        skip_special_tokens: bool,
        upto: int | None = None,
        final: bool = False,
    ) -> str:
        """Decode new tokens of ``token_ids`` up to index ``upto`` (default: all); returns the text added.

        ``final`` (the sequence has ended) emits a trailing U+FFFD too: no token will complete it.
        """
        end = len(token_ids) if upto is None else upto
        if end <= state.read_offset:
            return ""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip_special_tokens)
        full = decode(token_ids[state.prefix_offset : end], skip_special_tokens=skip_special_tokens)
        if (full.endswith("\ufffd") and not final) or len(full) <= len(prefix):
            return ""
        new_text = full[len(prefix) :]
        state.prefix_offset, state.read_offset = state.read_offset, end
        state.text += new_text
        return new_text
