"""Verifying draft tokens against the target model's logits (speculative decoding).

A sequence that carries k draft tokens gets k + 1 rows of logits from one forward: row j is the
target's distribution for the position of draft j (row k for the token after the last draft).

Greedy rows accept drafts while each equals the target's argmax and then emit the argmax, so the
output is token for token what decoding one token at a time gives. Sampled rows use the standard
rejection-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft ``d`` drawn from ``q`` is
accepted with probability ``min(1, p(d) / q(d))``; the first rejected position emits a token from
the residual ``max(p - q, 0)`` (renormalised), and when every draft is accepted one more token comes
from the last row's ``p``. Whatever ``q`` is, each emitted token is distributed as the target's
``p``. A proposer without a distribution (prompt lookup, a greedy draft model) proposes a point
mass, ``q = one_hot(d)``: acceptance is ``p(d)`` and the residual is ``p`` without ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quire.sampling.sampler import Sampler, SamplerOutput, SamplingBatch


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: list[int],
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens one sequence emits: its accepted drafts, then one token from the target.

    Args:
        target_probs: [k + 1, vocab] the target's (processed) distribution at each position;
            rows need only be proportional to probabilities.
        draft_token_ids: the k drafts.
        draft_probs: [k, vocab] the distribution each draft was drawn from; None for point masses.
        generator: the random source (a seeded request's own generator).

    Returns:
        Between 1 and k + 1 tokens: ``draft_token_ids[:a]`` and the token at position ``a``.
    """
    k = len(draft_token_ids)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for {k} drafts (needs k + 1)")
    p_all = target_probs.double()
    p_all = p_all / p_all.sum(dim=-1, keepdim=True)
    for j, draft in enumerate(draft_token_ids):
        p = p_all[j]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[draft] = 1.0
        else:
            q = draft_probs[j].double()
            q = q / q.sum()
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u * float(q[draft]) < float(p[draft]):  # u < p(d) / q(d), without dividing by q(d) = 0
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p <= q everywhere only when p == q: then d was accepted surely
            residual = p
        token = int(torch.multinomial(residual, 1, generator=generator))
        return [*draft_token_ids[:j], token]
    return [*draft_token_ids, int(torch.multinomial(p_all[k], 1, generator=generator))]


@dataclass
class VerifiedDrafts:
    """The verification of one step's drafts: per drafting chunk, its rows and how many drafts held.

    ``samples`` has ``num_drafts[i] + 1`` consecutive rows for chunk ``i`` starting at
    ``first_rows[i]``; its first ``num_accepted[i] + 1`` rows are the tokens the chunk emits
    (with their logprobs), the rest are unused.
    """

    first_rows: list[int]
    num_accepted: list[int]
    samples: SamplerOutput


class DraftVerifier:
    """Applies the acceptance rule to a step's draft rows, batch-invariantly (per-sequence random draws)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, drafts: list[list[int]]) -> VerifiedDrafts:
        """``logits``: [sum(k_i + 1), vocab], chunk after chunk; ``batch``: one row per chunk."""
        first_rows: list[int] = []
        row = 0
        for d in drafts:
            first_rows.append(row)
            row += len(d) + 1
        if row != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits for {row} verified positions")
        tokens = logits.argmax(dim=-1)
        argmax = tokens.tolist()  # one device-to-host copy for every greedy row's comparisons
        greedy = (batch.temperature == 0).tolist()
        num_accepted: list[int] = []
        for i, d in enumerate(drafts):
            first = first_rows[i]
            if greedy[i]:
                held = argmax[first : first + len(d)]
                num_accepted.append(next((j for j, (a, b) in enumerate(zip(held, d, strict=True)) if a != b), len(d)))
                continue
            rows = logits[first : first + len(d) + 1]
            generator = batch.generators[i] or self.sampler.generator
            # Drawn where the generator lives: a seeded request's draws are the same on every device.
            probs = self.sampler.probs(rows, batch.select([i] * (len(d) + 1))).to(generator.device)
            emitted = rejection_sample(probs, d, None, generator)
            tokens[first : first + len(emitted)] = torch.tensor(emitted, dtype=tokens.dtype, device=tokens.device)
            num_accepted.append(len(emitted) - 1)
        return VerifiedDrafts(first_rows, num_accepted, self.sampler.score(logits, tokens, batch.num_logprobs))
