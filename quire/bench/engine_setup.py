"""The real engine for trace benchmarks, built through ``EngineArgs`` like any user would.

``quire bench memory`` and ``quire bench block-size`` need one engine per allocator or block
size. Each is a fresh ``LLMEngine`` (the default model loads in seconds), so every setting the
engine derives from its arguments (the ``max_model_len`` cap, the host pool, tensor
parallelism) applies to the layout under test, and nothing is swapped in from outside.
"""

from __future__ import annotations

from collections.abc import Sequence

from quire.config import EngineArgs

__all__ = ["load_engine", "load_tokenizer", "warm_up"]


def load_engine(
    model: str | None,
    kv_slots: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    dtype: str = "auto",
    num_threads: int | None = None,
    kv_allocator: str = "paged",
):
    """An ``LLMEngine`` with exactly ``kv_slots // block_size`` KV blocks, ``kv_allocator``, prefix caching off."""
    from quire.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=model,
        dtype=dtype,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_kv_blocks=max(1, kv_slots // block_size),
        enable_prefix_caching=False,
        num_threads=num_threads,
        kv_allocator=kv_allocator,
    )
    return LLMEngine(args)


def load_tokenizer(model: str | None):
    """The model's tokenizer alone (to build traces before any engine exists)."""
    from quire.models.loader import load_tokenizer as load
    from quire.models.loader import resolve_model_path

    return load(resolve_model_path(model))


def warm_up(engine, tokens: Sequence[int]) -> None:
    """One short request first, so the first timed step does not pay one-off costs (kernel load, allocations)."""
    from quire.sampling_params import SamplingParams

    engine.add_request("warm-up", list(tokens[:32]), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
