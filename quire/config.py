"""Engine settings, grouped by the subsystem that reads them.

``EngineArgs`` carries the user-facing arguments (vLLM's names); ``EngineArgs.create_config``
validates them once and resolves the ones that depend on the model (``max_model_len``) or
the machine (``kv_cache_memory_gb``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

# The dtypes a CPU runs; a CUDA device also runs float16 (``resolve_dtype`` refuses it on a CPU
# with the reason rather than a bare "invalid choice").
CPU_DTYPES = ("auto", "float32", "bfloat16")
DTYPES = (*CPU_DTYPES, "float16")
# Where the engine runs: auto is CUDA when PyTorch sees a CUDA device, else the CPU (cuda:N also
# accepted). ``quire.worker.platform`` holds what differs between them.
DEVICES = ("auto", "cpu", "cuda")
# On a CUDA device, the share of its memory the engine may hold (weights, activations, KV pool) when
# neither ``kv_cache_memory_gb`` nor ``num_kv_blocks`` is given, as vLLM's gpu_memory_utilization.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
PREEMPTION_MODES = ("auto", "swap", "recompute")
SCHEDULING_POLICIES = ("fcfs", "priority")
# The step's token budget when ``max_num_batched_tokens`` is not given: large enough that one long
# prompt prefills in few chunks, small enough to keep decode latency low.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
# KV allocation policies (quire.core.allocator_registry): Quire's paged manager, and the paper's
# contiguous-reservation baselines, which the memory benchmark serves traces with.
KV_ALLOCATORS = ("paged", "orca-max", "orca-pow2", "orca-oracle", "static")
DEFAULT_KV_ALLOCATOR = "paged"
# Attention backends: the CPU kernel (``TorchAttentionBackend``) or the Triton kernels
# (``TritonAttentionBackend``; on a CPU device only under ``TRITON_INTERPRET=1``, for tests).
ATTENTION_BACKENDS = ("auto", "cpu", "triton")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # path to a Hugging Face model directory or a .gguf file
    dtype: str  # resolved: "float32" or "bfloat16"
    max_model_len: int
    seed: int


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_kv_blocks: int | None  # exact count; None: derive from kv_cache_memory_gb
    kv_cache_memory_gb: float | None
    enable_prefix_caching: bool
    swap_space_gb: float = 0.0  # host (swap) KV pool budget
    num_host_kv_blocks: int | None = None  # exact host block count; None: derive from swap_space_gb
    kv_allocator: str = DEFAULT_KV_ALLOCATOR  # one of KV_ALLOCATORS
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # a CUDA pool's budget share


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"  # "fcfs" | "priority"
    preemption_mode: str = "auto"  # "auto" | "swap" | "recompute"
    # "auto" swaps a single sequence once it holds at least this many computed tokens and
    # recomputes shorter ones; groups of several sequences always swap. The engine measures the
    # crossover on its machine and model at start (worker/preemption_calibration.py); this value
    # stands where it does not (several ranks, no host pool, a scheduler built on its own).
    swap_min_tokens: int = 16
    # Starvation guard under "priority": a request that has waited this many steps is promoted
    # ahead of every request that has not been promoted.
    priority_aging_steps: int = 1000


# Speculative decoding: the proposer methods and their defaults (vLLM's names).
SPEC_METHODS = ("ngram", "draft_model")
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
DEFAULT_PROMPT_LOOKUP_MAX = 4
# A 1-token match drafts at almost every step of open-ended text and is rarely right; from 2 tokens
# on, the repetitive tasks of `quire bench throughput --speculative` accepted more drafts and the
# open-ended one drafted 6x less (docs/benchmarks.md).
DEFAULT_PROMPT_LOOKUP_MIN = 2
_SPEC_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Which proposer drafts tokens for the target to verify, and how many per step.

    ``ngram`` looks the sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens up
    earlier in the sequence and proposes what followed (prompt lookup); ``draft_model`` runs the
    small model at ``model`` over its own KV cache, paged through the target's block tables.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP_MIN
    model: str | None = None

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig:
        """From ``LLM(speculative_config=...)``'s dict or ``--speculative-config``'s JSON text.

        The method defaults to ``draft_model`` when a ``model`` is given (vLLM's convention).
        Raises ``ValueError`` naming the bad key.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or JSON object), got {type(value).__name__}.")
        unknown = sorted(set(value) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {list(_SPEC_KEYS)}.")
        model = value.get("model")
        method = value.get("method", "draft_model" if model is not None else None)
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {SPEC_METHODS}, got {method!r}.")
        if method == "draft_model" and not (isinstance(model, str) and model):
            raise ValueError("speculative_config.model (a path) is required for method 'draft_model'.")
        if method == "ngram" and model is not None:
            raise ValueError("speculative_config.model is only for method 'draft_model', not 'ngram'.")
        config = cls(
            method=method,
            num_speculative_tokens=value.get("num_speculative_tokens", DEFAULT_NUM_SPECULATIVE_TOKENS),
            prompt_lookup_max=value.get("prompt_lookup_max", DEFAULT_PROMPT_LOOKUP_MAX),
            prompt_lookup_min=value.get("prompt_lookup_min", DEFAULT_PROMPT_LOOKUP_MIN),
            model=model,
        )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            number = getattr(config, name)
            if not (isinstance(number, int) and not isinstance(number, bool) and number >= 1):
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {number!r}.")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({config.prompt_lookup_min}) is larger than "
                f"prompt_lookup_max ({config.prompt_lookup_max})."
            )
        return config


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    speculative: SpeculativeConfig | None = None


def _arg(default, help: str, **cli) -> object:  # noqa: A002 - argparse's name
    """A field whose command-line help (and any choices or short aliases) sits next to its default.

    ``quire.entrypoints.engine_args`` turns every ``EngineArgs`` field into a flag from this
    metadata, so the dataclass is the one place where an engine argument is declared.
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineArgs:
    """Arguments accepted by ``LLM(...)`` and, one flag per field, by ``quire serve`` / ``quire generate``."""

    model: str | None = _arg(
        None,
        "Hugging Face model directory or .gguf file; nothing is downloaded "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    dtype: str = _arg(
        "auto",
        "weights and activations; auto is float32 on a CPU (bfloat16 is faster, but its greedy text drifts "
        "from float32's and depends on the batch) and bfloat16 (float16 where unsupported) on a GPU; "
        "float16 only on a GPU",
        choices=DTYPES,
    )
    device: str = _arg("auto", "cpu or cuda (cuda:N); auto is cuda when PyTorch sees a CUDA device, else cpu")
    gpu_memory_utilization: float = _arg(
        DEFAULT_GPU_MEMORY_UTILIZATION,
        "on a GPU, the share of its memory for weights, activations and the KV pool; the pool gets what "
        "a profiling forward leaves (ignored with --kv-cache-memory-gb or --num-kv-blocks, and on a CPU)",
    )
    enforce_eager: bool = _arg(
        False, "on a GPU, run every step eagerly instead of replaying decode steps captured as CUDA graphs"
    )
    block_size: int = _arg(16, "tokens per KV block")
    max_model_len: int | None = _arg(None, "context length, prompt plus output (default: the model's)")
    max_num_seqs: int = _arg(256, "most sequences in one step")
    max_num_batched_tokens: int | None = _arg(
        None, f"most tokens in one step; longer prompts prefill in chunks (default: {DEFAULT_MAX_NUM_BATCHED_TOKENS})"
    )
    seed: int = _arg(0, "engine random seed (requests without a seed of their own sample from it)")
    kv_cache_memory_gb: float | None = _arg(
        None, "GiB for the KV pool (default: a share of the available memory, capped)"
    )
    num_kv_blocks: int | None = _arg(None, "exact KV block count; overrides --kv-cache-memory-gb")
    enable_prefix_caching: bool = _arg(True, "reuse the KV blocks of prompt prefixes already computed")
    num_threads: int | None = _arg(None, "torch threads per rank (default: this host's cores shared by its ranks)")
    tensor_parallel_size: int = _arg(
        1,
        "ranks to shard the model over (local worker processes, or torchrun's ranks; see README)",
        aliases=("-tp",),
    )
    swap_space: float = _arg(4.0, "GiB of host memory for swapped-out KV blocks (vLLM's name)")
    num_host_kv_blocks: int | None = _arg(None, "exact host KV block count; overrides --swap-space")
    preemption_mode: str = _arg(
        "auto",
        "what a preempted request's KV blocks go through: auto picks swap or recompute by measured cost",
        choices=PREEMPTION_MODES,
    )
    scheduling_policy: str = _arg(
        "fcfs", "fcfs, or priority: requests' priority orders admission and preemption", choices=SCHEDULING_POLICIES
    )
    priority_aging_steps: int = _arg(
        1000, "under --scheduling-policy priority, promote a request after waiting this many steps"
    )
    kv_allocator: str = _arg(
        DEFAULT_KV_ALLOCATOR,
        "the KV allocator the scheduler drives; anything but paged is a contiguous-reservation baseline "
        "for benchmarks (no prefix cache, swap, n > 1 or beams)",
        choices=KV_ALLOCATORS,
    )
    attention_backend: str = _arg(
        "auto",
        "attention kernels: auto picks triton on a GPU and cpu otherwise; triton on a CPU device runs "
        "only under TRITON_INTERPRET=1 (Triton's interpreter, for testing the GPU path)",
        choices=ATTENTION_BACKENDS,
    )
    speculative_config: dict | None = _arg(
        None,
        'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4} '
        '(prompt lookup) or {"model": PATH, "num_speculative_tokens": 4} (a draft model); greedy output is unchanged',
        type=SpeculativeConfig.parse,
    )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}.")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, int | float) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}.")
        positive_int("block_size", self.block_size)
        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("tensor_parallel_size", self.tensor_parallel_size)
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if value is not None:
                positive_int(name, value)
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}.")
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, int | float) or self.swap_space < 0:
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {self.swap_space!r}.")
        if self.num_host_kv_blocks is not None and not (
            isinstance(self.num_host_kv_blocks, int)
            and not isinstance(self.num_host_kv_blocks, bool)
            and self.num_host_kv_blocks >= 0
        ):
            raise ValueError(f"num_host_kv_blocks must be an integer >= 0, got {self.num_host_kv_blocks!r}.")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}.")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}.")
        positive_int("priority_aging_steps", self.priority_aging_steps)
        if self.kv_allocator not in KV_ALLOCATORS:
            raise ValueError(f"kv_allocator must be one of {KV_ALLOCATORS}, got {self.kv_allocator!r}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)
            if self.kv_allocator != "paged":
                raise ValueError("speculative_config needs kv_allocator 'paged' (rejected drafts give blocks back).")
            spec = SpeculativeConfig.parse(self.speculative_config)
            if spec.method == "draft_model" and self.tensor_parallel_size > 1:
                raise ValueError("speculative_config with a draft model runs with tensor_parallel_size 1 only.")

    def create_config(self, model_path: str, model_max_len: int, dtype: str) -> EngineConfig:
        """Resolve defaults that depend on the loaded model; ``dtype`` is already resolved."""
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's context length ({model_max_len})."
            )
        max_batched = self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        return EngineConfig(
            model=ModelConfig(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=self.seed),
            cache=CacheConfig(
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                kv_cache_memory_gb=self.kv_cache_memory_gb,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space_gb=float(self.swap_space),
                num_host_kv_blocks=self.num_host_kv_blocks,
                kv_allocator=self.kv_allocator,
                gpu_memory_utilization=float(self.gpu_memory_utilization),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=max_model_len,
                policy=self.scheduling_policy,
                preemption_mode=self.preemption_mode,
                priority_aging_steps=self.priority_aging_steps,
            ),
            speculative=(
                SpeculativeConfig.parse(self.speculative_config) if self.speculative_config is not None else None
            ),
        )


# "auto" must be the fastest dtype *at equal fidelity*. bfloat16 is ~1.5x faster here but not at
# equal fidelity: on the fidelity prompts its greedy text leaves float32's (and transformers') in
# 3 of 9 prompts within 32 tokens, and its rounding makes outputs depend on the batch (3 of 9
# differ alone vs batched). float32 matches the reference and is batch-invariant, so it is the
# default; bfloat16 is opt-in. See docs/benchmarks.md.
AUTO_DTYPE = "float32"


def resolve_dtype(dtype: str, device_type: str = "cpu", bf16_supported: bool = True) -> str:
    """The dtype the engine runs for the name a user gave on a device of ``device_type``.

    "auto" is AUTO_DTYPE on a CPU; on a GPU it is bfloat16 where the device supports it
    (``bf16_supported``), else float16 (the GPU kernels' 16-bit types; float32 stays available).
    """
    if device_type == "cuda":
        if dtype != "auto":
            return dtype
        return "bfloat16" if bf16_supported else "float16"
    if dtype == "auto":
        return AUTO_DTYPE
    if dtype == "float16":
        raise ValueError("dtype 'float16' is not supported on CPU; use 'float32' or 'bfloat16'.")
    return dtype
