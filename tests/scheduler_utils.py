"""Requests for scheduler-level tests: real ``Request`` objects without a model or tokenizer."""

from __future__ import annotations

from quire.core.request import Request, Sequence
from quire.sampling_params import SamplingParams

FAKE_TOKEN = 7  # what a simulated step "generates"


def make_request(
    order: int, prompt_len: int, *, seq_id: int | None = None, priority: int = 0, group_size: int = 1
) -> Request:
    """Request ``r{order}`` arriving ``order``-th, with a deterministic prompt of ``prompt_len`` tokens."""
    prompt = [100 + (order * 31 + i) % 1000 for i in range(prompt_len)]
    seq = Sequence(
        seq_id=order if seq_id is None else seq_id, index=0, token_ids=list(prompt), num_prompt_tokens=prompt_len
    )
    return Request(
        request_id=f"r{order}",
        prompt=None,
        prompt_token_ids=list(prompt),
        params=SamplingParams(),
        arrival_order=order,
        arrival_time=float(order),
        seqs=[seq],
        eos_token_id=None,
        priority=priority,
        group_size=group_size,
    )
