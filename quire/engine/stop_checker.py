"""When a sequence ends: EOS, a stop token, a stop string, or a length limit."""

from __future__ import annotations

from quire.core.request import Request, Sequence
from quire.engine.detokenizer import Detokenizer
from quire.engine.request_output import SeqOutput


class StopChecker:
    """Checks a sequence's newest token and detokenizes what it adds to the text.

    The two go together because stop strings are matched on the text, and a stop ends the
    text exactly where it says: before the stop token or string unless
    ``include_stop_str_in_output``.
    """

    def __init__(self, detokenizer: Detokenizer, max_model_len: int) -> None:
        self.detokenizer = detokenizer
        self.max_model_len = max_model_len

    def check(self, request: Request, seq: Sequence, out: SeqOutput) -> None:
        """Finish ``seq`` (``finish_reason``, and ``out.stop_reason``) if its newest token ends it."""
        params = request.params
        token = seq.token_ids[-1]
        skip = params.skip_special_tokens
        may_stop = seq.num_output_tokens >= params.min_tokens
        is_eos = token == request.eos_token_id and not params.ignore_eos
        if may_stop and (is_eos or token in params.stop_token_ids):
            upto = None if params.include_stop_str_in_output else len(seq.token_ids) - 1
            self.detokenizer.update(out.decode, seq.token_ids, skip, upto, final=True)
            seq.finish_reason = "stop"
            out.stop_reason = None if token == request.eos_token_id and token not in params.stop_token_ids else token
            return
        new_text = self.detokenizer.update(out.decode, seq.token_ids, skip)
        if may_stop and new_text and params.stop_strings and self._stop_string(request, seq, out, new_text):
            return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            seq.finish_reason = "length"
            self.detokenizer.update(out.decode, seq.token_ids, skip, final=True)

    @staticmethod
    def _stop_string(request: Request, seq: Sequence, out: SeqOutput, new_text: str) -> bool:
        """Finish ``seq`` at the first stop string the new text completes; returns whether one did."""
        params = request.params
        text = out.decode.text
        for stop in params.stop_strings:
            begin = max(0, len(text) - len(new_text) - len(stop) + 1)
            at = text.find(stop, begin)
            if at != -1:
                end = at + len(stop) if params.include_stop_str_in_output else at
                out.decode.text = text[:end]
                seq.finish_reason, out.stop_reason = "stop", stop
                return True
        return False
