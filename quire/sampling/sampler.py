"""Logits to tokens for every sequence of a step at once.

Order of operations: penalties → logit_bias → bans (min_tokens, bad_words) → the allowed-token
mask (structured outputs, allowed_token_ids) → greedy argmax, or temperature →
top-k / top-p / min-p → sample. Reported logprobs are those of the raw model distribution.
Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)), so a seeded
request draws its noise from its own generator and gets the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import xgrammar as xgr


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors, built by the model runner for one step."""

    temperature: torch.Tensor  # [B] float; 0 marks a greedy row
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long; 0 = off
    min_p: torch.Tensor  # [B] float
    generators: list[torch.Generator | None]  # per row: the request's own when it is seeded
    num_logprobs: int  # the largest top-k asked for by any row (0: none); -1: no row wants logprobs
    presence_penalty: torch.Tensor | None = None  # [B]; None when no row uses penalties
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None  # [B, L] long, padded with vocab_size
    prompt_tokens: torch.Tensor | None = None  # [B, P] long, padded with vocab_size
    banned_rows: torch.Tensor | None = None  # [N] rows and [N] token ids to forbid (min_tokens, bad_words)
    banned_tokens: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None  # [N] rows, token ids and values added to the logits (logit_bias)
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    masked_rows: list[int] | None = None  # rows limited to the tokens their row of token_bitmask allows
    token_bitmask: torch.Tensor | None = None  # [B, words] int32 (quire.sampling.token_bitmask)
    # Masked rows whose top candidates must be allowed tokens (beam search: candidates become beams).
    masked_top_rows: list[int] | None = None

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())

    def to(self, device: torch.device) -> SamplingBatch:
        """The same batch with its tensors on ``device`` (the logits'); the generators stay where they are.

        Itself when already there (every step on a CPU).
        """
        if self.temperature.device == device:
            return self
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def select(self, rows: list[int]) -> SamplingBatch:
        """A batch of the given rows of this one (repeats allowed), e.g. one row per verified draft position.

        Only for batches without penalties or banned tokens: those depend on the tokens before
        each position, which repeating a row would not update.
        """
        if any(x is not None for x in (self.output_tokens, self.banned_rows, self.bias_rows, self.masked_rows)):
            raise NotImplementedError("selecting rows of a batch with penalties, bans, biases or token masks")
        index = torch.tensor(rows, dtype=torch.long)
        return SamplingBatch(
            temperature=self.temperature[index],
            top_p=self.top_p[index],
            top_k=self.top_k[index],
            min_p=self.min_p[index],
            generators=[self.generators[r] for r in rows],
            num_logprobs=self.num_logprobs,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] float: each sampled token's logprob
    ranks: torch.Tensor | None = None  # [B] long, 1-based, when logprobs were requested
    top_token_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


class Sampler:
    def __init__(self, generator: torch.Generator, kernels=None) -> None:
        self.generator = generator  # for rows without their own seed
        self.kernels = kernels  # compiled CPU ops (argmax_logsumexp), or None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw_logits = logits
        logits = self._apply_penalties(logits, batch)
        if batch.bias_rows is not None:
            logits = logits.index_put((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)
        if batch.banned_rows is not None:
            logits = logits.index_put((batch.banned_rows, batch.banned_tokens), logits.new_tensor(float("-inf")))
        if batch.masked_rows is not None:
            if logits is raw_logits:
                logits = logits.clone()
            # xgrammar's CPU kernel: -inf outside the allowed tokens of the listed rows only.
            xgr.apply_token_bitmask_inplace(logits, batch.token_bitmask, indices=batch.masked_rows)

        log_normalizer = None  # logsumexp of the raw logits, when the fused op computed it
        if logits is raw_logits and self._fused(raw_logits):
            greedy_tokens, log_normalizer = self.kernels.argmax_logsumexp(raw_logits)
        else:
            greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            sampled = self._sample(logits, batch)
            tokens = torch.where(batch.temperature == 0, greedy_tokens, sampled)

        top_forbidden = None
        if batch.masked_top_rows:
            rows = torch.tensor(batch.masked_top_rows, dtype=torch.long, device=logits.device)
            top_forbidden = (rows, torch.isneginf(logits.index_select(0, rows)))
        return self.score(raw_logits, tokens, batch.num_logprobs, log_normalizer, top_forbidden)

    @staticmethod
    def score(
        raw_logits: torch.Tensor,
        tokens: torch.Tensor,
        num_logprobs: int,
        log_normalizer: torch.Tensor | None = None,
        top_forbidden: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """``tokens`` (one per row, already chosen) with their logprobs under the raw model distribution.

        ``num_logprobs`` is ``SamplingBatch.num_logprobs``: -1 computes only the chosen tokens'
        logprobs, 0 adds their ranks, k > 0 also the top k. ``log_normalizer``: the rows'
        logsumexp, when already known. ``top_forbidden``: (rows, [rows, vocab] bool) tokens those
        rows' top k may not include (a constrained beam's candidates).
        """
        if num_logprobs < 0:
            # Only the sampled tokens' logprobs: skip materialising the [B, vocab] log-softmax.
            if log_normalizer is None:
                log_normalizer = raw_logits.logsumexp(dim=-1)
            chosen = raw_logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_normalizer
            return SamplerOutput(token_ids=tokens, logprobs=chosen)
        raw_logprobs = torch.log_softmax(raw_logits, dim=-1)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        out = SamplerOutput(token_ids=tokens, logprobs=chosen)
        out.ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        if num_logprobs > 0:
            candidates = raw_logprobs
            if top_forbidden is not None:  # rows whose candidates must be allowed tokens
                rows, forbidden = top_forbidden
                kept = raw_logprobs.index_select(0, rows).masked_fill(forbidden, float("-inf"))
                candidates = raw_logprobs.index_copy(0, rows, kept)
            out.top_logprobs, out.top_token_ids = candidates.topk(num_logprobs, dim=-1)
        return out

    def _fused(self, logits: torch.Tensor) -> bool:
        return self.kernels is not None and logits.is_cpu and logits.dtype == torch.float32 and logits.is_contiguous()

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.output_tokens is None:
            return logits
        rows, vocab = logits.shape
        counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(1, batch.output_tokens, torch.ones_like(batch.output_tokens, dtype=logits.dtype))
        counts = counts[:, :vocab]
        seen = counts > 0
        if batch.prompt_tokens is not None:
            in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
            in_prompt.scatter_(1, batch.prompt_tokens, True)
            seen = seen | in_prompt[:, :vocab]
        rep = batch.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
        return logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)

    @staticmethod
    def probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k / top-p, then min-p.

        Rows may not sum to 1 after min-p; both the exponential race and the rejection
        sampler only need them proportional.
        """
        temperature = torch.where(batch.temperature == 0, torch.ones_like(batch.temperature), batch.temperature)
        logits = logits / temperature.unsqueeze(1)
        logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        if bool((batch.min_p > 0).any()):
            keep = probs >= batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        return probs

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        probs = self.probs(logits, batch)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, gen in enumerate(batch.generators):
            if gen is None:
                continue
            if gen.device == noise.device:
                noise[row].exponential_(generator=gen)
            else:  # a request's generator lives on the host: its draws are the same on every device
                noise[row].copy_(torch.empty(noise.shape[1], dtype=noise.dtype).exponential_(generator=gen))
        return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p); a no-op for rows with both off."""
    use_k = bool((top_k > 0).any())
    use_p = bool((top_p < 1).any())
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if use_k:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if use_p:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
