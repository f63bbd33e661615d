"""Engine settings, grouped by the subsystem that reads them.

``EngineArgs`` carries the user-facing arguments (vLLM's names); ``EngineArgs.create_config``
validates them once and resolves the ones that depend on the model (``max_model_len``) or
the machine (``kv_cache_memory_gb``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

_DTYPES = ("auto", "float32", "bfloat16", "float16")


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


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig


@dataclass
class EngineArgs:
    """Arguments accepted by ``LLM(...)`` and the command line."""

    model: str | None = None
    dtype: str = "auto"
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    seed: int = 0
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    tensor_parallel_size: int = 1

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")
        positive_int("block_size", self.block_size)
        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("tensor_parallel_size", self.tensor_parallel_size)
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if value is not None:
                positive_int(name, value)
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def create_config(self, model_path: str, model_max_len: int, dtype: str) -> EngineConfig:
        """Resolve defaults that depend on the loaded model; ``dtype`` is already resolved."""
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's context length ({model_max_len})."
            )
        # Large enough that one long prompt prefills in few chunks, small enough to keep decode latency low.
        max_batched = self.max_num_batched_tokens or 512
        return EngineConfig(
            model=ModelConfig(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=self.seed),
            cache=CacheConfig(
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                kv_cache_memory_gb=self.kv_cache_memory_gb,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=max_model_len,
            ),
        )
