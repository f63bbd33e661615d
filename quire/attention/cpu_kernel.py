"""CPU paged-attention kernel: a PyTorch C++ extension built on first use.

The C++ source is ``csrc/paged_attention.cpp`` next to this file.  It is
compiled with ``torch.utils.cpp_extension.load`` the first time the kernel is
needed (or ahead of time with :func:`build`) into torch's extension cache,
which honours ``TORCH_EXTENSIONS_DIR`` and otherwise defaults to
``~/.cache/torch_extensions``.  A rebuild happens only when the source or the
flags change.

If the compilation fails (no compiler, unsupported platform, ...) a warning is
logged once and :func:`is_available` returns ``False``; callers should then
use :func:`quire.attention.reference.paged_attention_reference`.

Setting ``QUIRE_DISABLE_CPU_KERNEL=1`` makes the kernel unavailable without
trying to build it.

The library is compiled with ``-march=native``; its cache name carries a hash of
the CPU's feature flags, so a shared cache directory never hands a binary to
a CPU that cannot run it, and a hash of the sources and headers.  It registers the operator
``torch.ops.quire_pa.paged_attention_out`` (which writes into ``out``);
:func:`paged_attention` is the friendly wrapper.

Parallelism comes from ATen's intra-op thread pool, so
``torch.set_num_threads`` controls how many threads a call uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

__all__ = ["build", "is_available", "paged_attention", "build_seconds"]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "paged_attention.cpp", _CSRC / "fused_ops.cpp"]


def _cpu_tag() -> str:
    """Short hash of the CPU architecture and feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _source_tag() -> str:
    """Short hash of every file in csrc/: torch's rebuild check sees the sources, not the headers."""
    digest = hashlib.sha1()
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


_EXT_NAME = f"quire_cpu_{_cpu_tag()}_{_source_tag()}"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_ops = None  # torch.ops.quire_pa once loaded
_failed = False
_build_seconds: float | None = None


def _load():
    """Compile (or fetch from the cache) and load the extension, once.

    Returns the ``torch.ops.quire_pa`` namespace or None if unavailable.
    """
    global _ops, _failed, _build_seconds
    if _ops is not None or _failed:
        return _ops
    with _lock:
        if _ops is not None or _failed:
            return _ops
        if os.environ.get("QUIRE_DISABLE_CPU_KERNEL", "") not in ("", "0"):
            logger.warning(
                "quire CPU paged-attention kernel disabled by QUIRE_DISABLE_CPU_KERNEL; "
                "use the reference implementation"
            )
            _failed = True
            return None
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            # The library registers its operators with the dispatcher
            # (TORCH_LIBRARY) instead of being a Python module.
            load(
                name=_EXT_NAME,
                sources=[str(p) for p in _SOURCES],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                is_python_module=False,
                verbose=False,
            )
            ops = torch.ops.quire_pa
            ops.paged_attention_out  # noqa: B018 - raises if the registration is missing
            ops.add_rms_norm  # noqa: B018
            ops.small_linear  # noqa: B018
        except Exception as exc:  # compiler missing, build error, load error, ...
            _failed = True
            logger.warning(
                "quire CPU paged-attention kernel could not be built (%s: %s); "
                "callers should use quire.attention.reference.paged_attention_reference",
                type(exc).__name__,
                exc,
            )
            return None
        _ops = ops
        _build_seconds = time.perf_counter() - start
        logger.debug("quire CPU paged-attention kernel ready in %.1fs", _build_seconds)
        return _ops


def is_available() -> bool:
    """True if the compiled kernel can be used (builds it on first call)."""
    return _load() is not None


def build() -> bool:
    """Pre-compile the extension (for a Makefile / image build). Returns success."""
    return is_available()


def build_seconds() -> float | None:
    """Wall time the first successful :func:`is_available` took (compile or cache load)."""
    return _build_seconds


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of new query tokens over a paged KV cache (CPU, fp32/bf16).

    Args:
        query: ``[num_tokens, num_q_heads, head_dim]``, float32 or bfloat16.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, query dtype.
        value_cache: same shape and dtype as ``key_cache``.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a
            sequence's last block are never read.
        query_start_loc: int32 ``[num_seqs + 1]``; sequence ``s`` owns query rows
            ``query_start_loc[s]:query_start_loc[s + 1]``.
        seq_lens: int32 ``[num_seqs]``; KV length of each sequence including its
            new tokens (whose K/V are already in the cache).
        scale: softmax scale.
        out: optional preallocated output ``[num_tokens, num_q_heads, head_dim]``.

    Query row ``i`` of sequence ``s`` sits at position
    ``seq_lens[s] - query_len + i`` and attends to KV positions ``0..p``.
    Query head ``h`` uses kv head ``h // (num_q_heads // num_kv_heads)``.
    Accumulation is float32; the result has the query dtype.  Rows of a freshly
    allocated output not owned by any sequence are zero.

    Raises:
        RuntimeError: if the kernel is unavailable (see :func:`is_available`)
            or the inputs are inconsistent.
    """
    ops = _load()
    if ops is None:
        raise RuntimeError(
            "quire CPU paged-attention kernel is unavailable; use quire.attention.reference.paged_attention_reference"
        )
    zero_uncovered = out is None
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    ops.paged_attention_out(
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, float(scale), out, False, zero_uncovered
    )
    return out


def fused_ops():
    """``torch.ops.quire_pa`` with the fused layer ops (add_rms_norm, rotary_inplace, silu_and_mul,
    small_linear), or None."""
    return _load()


def _extension():
    """The registered operator namespace (``torch.ops.quire_pa``) or None.

    ``paged_attention_out(..., scale, out, force_generic, zero_uncovered)``;
    tests use ``force_generic=True`` to exercise the portable scalar path.
    """
    return _load()
