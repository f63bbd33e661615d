"""Quire's compiled CPU kernels: a PyTorch C++ extension built on first use, one per ISA level.

The C++ sources are in ``csrc/`` next to this file (paged attention, the fused layer ops, the
block-format linears). They are compiled with ``torch.utils.cpp_extension.load`` the first time a
kernel is needed (or ahead of time with :func:`build`) into torch's extension cache, which honours
``TORCH_EXTENSIONS_DIR`` and otherwise defaults to ``~/.cache/torch_extensions``.

Each ISA level (``scalar``, ``avx2``, ``avx512``, ``avx512_bf16``, ``amx`` on x86-64; ``scalar``,
``neon`` on aarch64; see ``csrc/isa.h``) is compiled with its own target flags into its own
library and operator namespace ``torch.ops.quire_<level>``, so one process can load several and
the tests run every level the machine has. The engine uses :func:`isa_level`: the CPU's highest,
or the one ``QUIRE_CPU_ISA`` caps the process at. A library's name carries the level, a hash of the CPU's flags
(it is tuned for them) and of the sources, so a shared cache never hands a binary to a CPU that
cannot run it.

If the compilation fails (no compiler, unsupported platform, ...) a warning is logged once and
:func:`is_available` returns ``False``; callers then use
:func:`quire.attention.reference.paged_attention_reference`. ``QUIRE_DISABLE_CPU_KERNEL=1`` makes
the kernels unavailable without trying to build them.

Parallelism comes from ATen's intra-op thread pool, so ``torch.set_num_threads`` controls how
many threads a call uses.
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

__all__ = ["build", "build_seconds", "is_available", "isa_level", "isa_levels", "kernels", "paged_attention"]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "paged_attention.cpp", _CSRC / "fused_ops.cpp", _CSRC / "decode_stack.cpp"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (x86 ``flags``, aarch64 ``Features``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_tag() -> str:
    """Short hash of the CPU architecture and feature flags (``-mtune=native`` depends on them)."""
    return hashlib.sha1(f"{platform.machine()} {sorted(cpu_flags())}".encode()).hexdigest()[:10]


def source_tag() -> str:
    """Short hash of every file in csrc/: torch's rebuild check sees the sources, not the headers."""
    digest = hashlib.sha1()
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


# ISA levels, lowest first: the CPU flags each needs and the target flags it is compiled with.
# ATen's vector layer follows CPU_CAPABILITY (256-bit on AVX2, 512-bit on AVX-512, NEON on aarch64).
_X86_LEVELS = {
    "scalar": ((), ["-march=x86-64", "-DQUIRE_SCALAR=1"]),
    "avx2": (("avx2", "fma", "f16c"), ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "avx512": (
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
        ["-march=x86-64-v4", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    ),
}
_X86_LEVELS["avx512_bf16"] = (
    _X86_LEVELS["avx512"][0] + ("avx512_bf16", "avx512_vnni"),
    _X86_LEVELS["avx512"][1] + ["-mavx512bf16", "-mavx512vnni"],
)
_X86_LEVELS["amx"] = (
    _X86_LEVELS["avx512_bf16"][0] + ("amx_tile", "amx_bf16"),
    _X86_LEVELS["avx512_bf16"][1] + ["-mamx-tile", "-mamx-bf16"],
)
_ARM_LEVELS = {
    "scalar": ((), ["-DQUIRE_SCALAR=1"]),
    "neon": (("asimd",), ["-DCPU_CAPABILITY=DEFAULT"]),
}
ISA_ENV = "QUIRE_CPU_ISA"


def _is_arm(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("aarch64", "arm64")


def _level_table(machine: str | None = None) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    return _ARM_LEVELS if _is_arm(machine) else _X86_LEVELS


def isa_levels() -> list[str]:
    """The ISA levels Quire uses here, lowest first (``scalar`` always): every level this CPU runs,
    up to ``QUIRE_CPU_ISA`` when it names one (so the process behaves as on a CPU of that level).

    Raises:
        ValueError: if ``QUIRE_CPU_ISA`` names no level of this architecture.
    """
    flags = cpu_flags()
    table = _level_table()
    supported = [name for name, (needs, _) in table.items() if all(f in flags for f in needs)]
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return supported
    if wanted not in table:
        raise ValueError(f"{ISA_ENV}={wanted!r}: expected one of {', '.join(table)}")
    if wanted not in supported:
        logger.warning("%s=%s: this CPU runs at most %s; using that", ISA_ENV, wanted, supported[-1])
        return supported
    return supported[: supported.index(wanted) + 1]


def isa_level() -> str:
    """The level the engine's kernels are built for: the highest of :func:`isa_levels`."""
    return isa_levels()[-1]


_CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG", "-fvisibility=hidden"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # level -> torch.ops namespace
_failed: set[str] = set()
_build_seconds: dict[str, float] = {}


def build_flags(level: str, machine: str | None = None) -> list[str]:
    """The compiler flags of ``level``'s library for ``machine`` (default: this one's architecture).

    Tests cross-compile the sources with them for the architectures this machine is not.
    """
    tune = ["-mtune=native"] if machine is None and not _is_arm() else []
    return _CFLAGS + _level_table(machine)[level][1] + tune + [f"-DQUIRE_PA_NAMESPACE=quire_{level}"]


def sources() -> list[Path]:
    """The C++ sources every level's library is compiled from."""
    return list(_SOURCES)


def _load(level: str | None = None):
    """Compile (or fetch from the cache) and load the extension for ``level``, once.

    Returns the ``torch.ops.quire_<level>`` namespace or None if unavailable. Each level is its
    own library with its own operator namespace, so one process can load several (the tests
    compare them).
    """
    level = level or isa_level()
    if level in _loaded or level in _failed:
        return _loaded.get(level)
    with _lock:
        if level in _loaded or level in _failed:
            return _loaded.get(level)
        if os.environ.get("QUIRE_DISABLE_CPU_KERNEL", "") not in ("", "0"):
            logger.warning(
                "quire CPU kernels disabled by QUIRE_DISABLE_CPU_KERNEL; use the reference implementation"
            )
            _failed.add(level)
            return None
        if level not in isa_levels():
            raise ValueError(f"ISA level {level!r} is not one this CPU runs ({', '.join(isa_levels())})")
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            # The library registers its operators with the dispatcher
            # (TORCH_LIBRARY) instead of being a Python module.
            load(
                name=f"quire_cpu_{level}_{_cpu_tag()}_{source_tag()}",
                sources=[str(p) for p in _SOURCES],
                extra_cflags=build_flags(level),
                extra_ldflags=_LDFLAGS,
                is_python_module=False,
                verbose=False,
            )
            ops = getattr(torch.ops, f"quire_{level}")
            ops.paged_attention_out  # noqa: B018 - raises if the registration is missing
            ops.add_rms_norm  # noqa: B018
            ops.small_linear  # noqa: B018
        except Exception as exc:  # compiler missing, build error, load error, ...
            _failed.add(level)
            logger.warning(
                "quire CPU kernels (%s) could not be built (%s: %s); "
                "callers should use quire.attention.reference.paged_attention_reference",
                level,
                type(exc).__name__,
                exc,
            )
            return None
        _loaded[level] = ops
        _build_seconds[level] = time.perf_counter() - start
        logger.debug("quire CPU kernels (%s) ready in %.1fs", level, _build_seconds[level])
        return ops


def is_available() -> bool:
    """True if the compiled kernel can be used (builds it on first call)."""
    return _load() is not None


def build(level: str | None = None) -> bool:
    """Pre-compile the extension for ``level`` (default: :func:`isa_level`). Returns success."""
    return _load(level) is not None


def build_seconds() -> float | None:
    """Wall time the first successful load of the engine's level took (compile or cache load)."""
    return _build_seconds.get(isa_level())


def level_of(ops) -> str:
    """The ISA level a namespace returned by :func:`kernels` was built for."""
    return next(level for level, loaded in _loaded.items() if loaded is ops)


def kernels(level: str | None = None):
    """``torch.ops.quire_<level>``: every compiled op built for ``level`` (default :func:`isa_level`), or None."""
    return _load(level)


# The shortest KV range a decode item is split into when the machine's own length is not known
# (attention/split_calibration.py measures it).
DEFAULT_SPLIT_MIN_KV = 512


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    split_min_kv: int = DEFAULT_SPLIT_MIN_KV,
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
        split_min_kv: with fewer work items than threads, long decode items are cut into KV
            ranges of at least this many positions (0: never); results agree to rounding.

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
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, float(scale), out, split_min_kv,
        False, zero_uncovered,
    )
    return out


def fused_ops():
    """The engine level's op namespace with the fused layer ops (add_rms_norm, rotary_inplace,
    silu_and_mul, small_linear, quant_linear, ...), or None."""
    return _load()


def _extension():
    """The engine level's op namespace or None.

    ``paged_attention_out(..., scale, out, split_min_kv, force_generic, zero_uncovered)``;
    tests use ``force_generic=True`` to exercise the portable scalar path.
    """
    return _load()
