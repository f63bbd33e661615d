"""The engine: requests in, one scheduled model step at a time, RequestOutputs out.

A step is three phases, each owned by one object: the scheduler decides which tokens run,
the model runner runs them on every rank and samples, and the output processor applies the
samples to the requests. Requests come in through the input processor, which checks them and
builds what the scheduler runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import torch

from quire.attention.selector import build_attention_backend
from quire.config import EngineArgs, EngineConfig, resolve_dtype
from quire.core.allocator_registry import build_kv_allocator
from quire.core.kv_allocator import KVUsage
from quire.core.kv_cache_manager import KVCacheManager
from quire.core.request import Request
from quire.core.scheduler import Scheduler, SchedulerOutput
from quire.distributed.comm import TPGroup
from quire.distributed.launch import (
    COLLECTIVE_TIMEOUT,
    Rendezvous,
    WorkerDiedError,
    WorkerProcesses,
    rendezvous_for,
)
from quire.distributed.partition import head_shard
from quire.engine.input_processor import InputProcessor, Prompt
from quire.engine.kv_sizing import kv_blocks_from_profile, needs_profile, num_host_blocks, num_kv_blocks
from quire.engine.model_info import ModelInfo
from quire.engine.output_processor import OutputProcessor
from quire.engine.ranks import Ranks
from quire.engine.step_record import StepObserver, StepRecord
from quire.models.loader import (
    LoadedModel,
    load_model_files,
    load_tokenizer,
    resolve_model_path,
)
from quire.models.registry import build_model
from quire.outputs import RequestOutput
from quire.sampling.sampler import Sampler
from quire.sampling_params import BeamSearchParams, SamplingParams
from quire.spec_decode.builder import build_proposer
from quire.structured.compiler import StructuredOutputCompiler
from quire.structured.state import GrammarStates
from quire.worker.cache_engine import CacheEngine, kv_bytes_per_block
from quire.worker.cuda_graphs import build_decode_graphs, uses_decode_graphs
from quire.worker.model_runner import ModelRunner, RunnerOutput
from quire.worker.platform import Platform, rank_device, resolve_device
from quire.worker.preemption_calibration import swap_crossover
from quire.worker.profiling import profile_forward
from quire.worker.tp_worker import TORCH_DTYPES, run_worker, threads_per_rank, worker_main

logger = logging.getLogger(__name__)

class LLMEngine:
    """Owns the model, the KV cache, the scheduler and every live request."""

    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        # Resolved before any worker starts, so that a missing CUDA device fails here, with the reason.
        self.platform = Platform(rank_device(resolve_device(args.device), 0))
        self.device = self.platform.device
        # Tensor parallelism: this process is rank 0 (the driver) of ``tensor_parallel_size`` ranks.
        self.group = TPGroup()
        self.workers: WorkerProcesses | None = None
        self._failure: BaseException | None = None
        path = resolve_model_path(args.model)  # a wrong path fails before any worker starts
        rendezvous = rendezvous_for(args.tensor_parallel_size) if args.tensor_parallel_size > 1 else None
        if rendezvous is not None and rendezvous.rank != 0:
            # Started by torchrun (or by hand) as another rank: serve the driver, then end the process.
            run_worker(args, rendezvous)
            raise SystemExit(0)
        if rendezvous is not None and rendezvous.spawn_workers:
            self.workers = WorkerProcesses(worker_main, args, rendezvous)
        self._ranks = Ranks(self.group, self.workers, torch.get_num_threads())
        self._finalizer = weakref.finalize(self, self._ranks.stop)
        try:
            self._build(args, path, rendezvous)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, args: EngineArgs, path: str, rendezvous: Rendezvous | None) -> None:
        if rendezvous is not None:
            self.group = self._ranks.group = TPGroup.connect(
                rendezvous.init_method, 0, rendezvous.size, COLLECTIVE_TIMEOUT, self.platform.dist_backend
            )
        loaded = load_model_files(path)
        self.arch = loaded.config
        dtype_name = resolve_dtype(args.dtype, self.device.type, self.platform.supports_bf16)
        self.dtype = TORCH_DTYPES[dtype_name]
        if args.num_threads or args.tensor_parallel_size > 1:
            torch.set_num_threads(threads_per_rank(args))
        # This rank's KV heads; rank 0 holds the most, so it sizes the cache for every rank.
        self.num_local_kv_heads = len(
            head_shard(self.arch.num_heads, self.arch.num_kv_heads, self.group.size, self.group.rank).kv_heads
        )
        self.config = self._create_config(args, path, dtype_name)
        per_block = kv_bytes_per_block(self.arch, self.config.cache.block_size, self.dtype, self.num_local_kv_heads)
        host_blocks = num_host_blocks(self.config.cache, per_block)
        if needs_profile(self.config.cache, self.platform):
            # The pool gets the memory that the weights and the largest step's activations leave.
            self._load_model(loaded, path, self.config.scheduler.max_model_len)
            peak = profile_forward(
                self.model, self.arch, self.dtype, self.platform, self.config, self.num_local_kv_heads
            )
            num_blocks = kv_blocks_from_profile(self.config.cache, per_block, self.platform, peak)
            self._commit_cache_size(num_blocks, host_blocks, dtype_name)
            self.cache = self._cache_engine(num_blocks, host_blocks, back_now=True)
        else:
            num_blocks = num_kv_blocks(self.config.cache, per_block, check_memory=not self.platform.is_cuda)
            self._commit_cache_size(num_blocks, host_blocks, dtype_name)
            self.cache = self._cache_engine(num_blocks, host_blocks, back_now=False)
            # Backing the pool's pages takes seconds (CacheEngine.back_pages); a thread does it (torch
            # releases the GIL) while the tokenizer, mostly Python, and the model load.
            with ThreadPoolExecutor(1, thread_name_prefix="quire-kv-pages") as pool:
                backing = pool.submit(self.cache.back_pages)
                self._load_model(loaded, path, self.max_model_len)
                backing.result()
        del loaded
        self._assemble(num_blocks, host_blocks)

    def _create_config(self, args: EngineArgs, path: str, dtype_name: str) -> EngineConfig:
        model_max_len = self.arch.max_position_embeddings
        if self.arch.sliding_window:  # no windowed attention: stay within the window
            model_max_len = min(model_max_len, self.arch.sliding_window)
        return args.create_config(path, model_max_len, dtype_name)

    def _commit_cache_size(self, num_blocks: int, host_blocks: int, dtype_name: str) -> None:
        """Set ``max_model_len`` (at most what the pool holds) and tell the other ranks the sizes."""
        block_size = self.config.cache.block_size
        capacity = num_blocks * block_size
        max_model_len = self.config.scheduler.max_model_len
        if capacity < max_model_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, max_model_len)
            max_model_len = capacity
        self.max_model_len = max_model_len
        if self.group.size > 1:
            dtype_code = list(TORCH_DTYPES).index(dtype_name)
            self.group.broadcast(torch.tensor([num_blocks, block_size, max_model_len, dtype_code, host_blocks]))

    def _cache_engine(self, num_blocks: int, host_blocks: int, back_now: bool) -> CacheEngine:
        """The KV tensors: the scheduler's blocks, plus the scratch block of the decode graphs if they run."""
        extra = 1 if uses_decode_graphs(self.args, self.platform) else 0
        return CacheEngine(
            self.arch,
            num_blocks + extra,
            self.config.cache.block_size,
            self.dtype,
            self.device,
            self.num_local_kv_heads,
            host_blocks,
            back_now=back_now,
        )

    def _load_model(self, loaded: LoadedModel, path: str, max_positions: int) -> None:
        """The tokenizer, the attention backend and the model."""
        self.tokenizer = load_tokenizer(path)
        self.attention = build_attention_backend(self.args.attention_backend, self.device)
        self.model = build_model(loaded, self.attention, self.dtype, max_positions, self.device, self.group)

    def _assemble(self, num_blocks: int, host_blocks: int) -> None:
        """The step's three owners (scheduler, runner, output processor) and the input processor."""
        cache = self.config.cache
        self.kv_cache = build_kv_allocator(
            cache.kv_allocator,
            num_blocks,
            cache.block_size,
            self.max_model_len,
            cache.enable_prefix_caching,
            host_blocks,
        )
        scheduler_config = dataclasses.replace(
            self.config.scheduler, max_model_len=self.max_model_len, **self._measured_preemption(host_blocks)
        )
        self.proposer = build_proposer(
            self.config.speculative,
            self.attention,
            self.dtype,
            self.device,
            self.max_model_len,
            self.arch.vocab_size,
            num_blocks,
            cache.block_size,
            host_blocks,
        )
        self.scheduler = Scheduler(scheduler_config, self.kv_cache, self.proposer)
        sampler = Sampler(torch.Generator(self.device).manual_seed(self.config.model.seed), self.model.ops.kernels)
        graphs = build_decode_graphs(self.args, self.platform, self.model, self.cache, num_blocks, self.max_model_len)
        # Structured outputs: the output processor keeps each constrained sequence's matcher, the
        # runner reads them for the step's masks, the input processor compiles the constraints.
        grammars = GrammarStates(self.arch.vocab_size)
        self.runner = ModelRunner(self.model, self.cache, sampler, self.group, graphs, grammars)
        self.eos_token_id = self._eos_token_id()
        seq_ids = itertools.count()  # one numbering for prompt sequences and forks
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len, seq_ids, grammars)
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.arch.vocab_size,
            self.max_model_len,
            self.eos_token_id,
            seq_ids,
            self.output_processor.requests,
            StructuredOutputCompiler(self.tokenizer, self.arch.vocab_size, self.eos_token_id),
        )
        self.num_steps = 0  # steps that ran the model
        self._observers: list[StepObserver] = []

    # -- set-up helpers -----------------------------------------------------------------

    def _measured_preemption(self, host_blocks: int) -> dict:
        """``swap_min_tokens`` measured on this machine and model, where "auto" preemption chooses
        between swapping and recomputing a single sequence (one rank, a host pool, paged blocks)."""
        cfg = self.config
        if (cfg.scheduler.preemption_mode != "auto" or not host_blocks or self.group.size > 1
                or cfg.cache.kv_allocator != "paged"):
            return {}
        try:
            found = swap_crossover(self.model, self.cache, cfg.model.model, self.max_model_len)
        except ValueError:  # pools too small to time: the default stands
            return {}
        logger.info("preemption: a single sequence is swapped from %d tokens on, recomputed below "
                    "(tokens, swap ms, recompute ms: %s)", found["swap_min_tokens"],
                    ", ".join(f"{t} {s:.2f} {r:.2f}" for t, s, r in found["points"]))
        return {"swap_min_tokens": found["swap_min_tokens"]}

    def _eos_token_id(self) -> int | None:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return self.arch.eos_token_ids[0] if self.arch.eos_token_ids else None

    # -- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | BeamSearchParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> Request:
        """Queue a request. ``params`` is a ``SamplingParams`` (``n`` / ``best_of`` sequences) or a
        ``BeamSearchParams`` (beam search; its output comes when the search ends). A prompt dict
        may carry a ``cache_salt``: only requests with the same salt share prefix-cache blocks.
        """
        request = self.input_processor.process(request_id, prompt, params, arrival_time, priority, self.scheduler)
        self.output_processor.add_request(request)
        self.scheduler.add_request(request)
        return request

    def inject_fault(self, select: Callable[[Request], bool] | None, error: Exception | None = None) -> None:
        """Test seam for fault isolation: processing the new tokens of any request ``select`` picks
        raises ``error`` (as a detokenizer bug would); that request fails alone, with its output's
        ``error`` set. ``None`` removes the fault. See ``OutputProcessor.inject_fault``."""
        self.output_processor.inject_fault(select, error)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request from whatever state it is in; its blocks in both pools are free on return."""
        return self.output_processor.abort(request_id, self.scheduler)

    abort = abort_request

    @property
    def requests(self) -> Mapping[str, Request]:
        """The live requests by id (read-only): added and not yet finished or aborted."""
        return MappingProxyType(self.output_processor.requests)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def num_unfinished_requests(self) -> int:
        """Requests waiting, running or swapped out: what the next steps have to serve."""
        return self.scheduler.num_unfinished_requests()

    def num_waiting_requests(self) -> int:
        """Requests not started yet (or preempted by recompute): the next steps prefill them."""
        return len(self.scheduler.waiting)

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of requests that produced tokens or finished."""
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if self.proposer is not None:
            self.proposer.propose(sched)  # speculative decoding: drafts for the slots just reserved
        scheduled = time.perf_counter()
        if sched.is_empty:
            self._notify(StepRecord(sched, None, scheduled - start, 0.0, 0.0))
            return []
        result = self._execute(sched)
        self.num_steps += 1
        executed = time.perf_counter()
        self.scheduler.mark_computed(sched)
        outputs = self.output_processor.update(result, self.scheduler)
        updated = time.perf_counter()
        self._notify(StepRecord(sched, result, scheduled - start, executed - scheduled, updated - executed))
        return outputs

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call ``observer(record)`` after every ``step`` (an empty one too), in the stepping thread.

        An observer's exception propagates out of ``step``, after the step's state changes.
        """
        self._observers.append(observer)

    def remove_step_observer(self, observer: StepObserver) -> None:
        self._observers.remove(observer)

    def _notify(self, record: StepRecord) -> None:
        for observer in self._observers:
            observer(record)

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the step on every rank; any rank's failure ends the engine with a ``WorkerDiedError``."""
        if self.group.size == 1:
            return self.runner.execute(sched)
        if self._failure is not None:
            raise WorkerDiedError(f"the tensor-parallel group failed earlier: {self._failure}") from self._failure
        try:
            if self.workers is not None:
                self.workers.check()
            return self.runner.execute(sched)
        except Exception as exc:
            self._failure = exc if isinstance(exc, WorkerDiedError) else self._diagnose(exc)
            self._ranks.broken = True
            raise self._failure from exc

    def _diagnose(self, exc: BaseException) -> WorkerDiedError:
        """Name the dead worker when a collective fails (its exit code shows up within moments)."""
        deadline = time.monotonic() + 2.0
        while self.workers is not None and not self.workers.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = self.workers.dead() if self.workers is not None else []
        who = f"worker {', '.join(dead)} died" if dead else "a rank failed or stopped answering"
        return WorkerDiedError(f"tensor-parallel step failed, {who}: {exc}")

    def check_health(self) -> None:
        """Raise ``WorkerDiedError`` if a tensor-parallel rank failed or a spawned worker exited.

        Reads only process exit codes, so any thread may call it while another runs ``step``.
        """
        if self._failure is not None:
            raise WorkerDiedError(f"the tensor-parallel group failed: {self._failure}")
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do with one rank). The engine is unusable after."""
        self._finalizer()

    # -- introspection ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters and gauges, each from the object that keeps it (see ``quire.metrics``)."""
        return {
            **self.kv_cache.stats(),
            **self.scheduler.stats(),
            **self.output_processor.stats(),
            "num_steps": self.num_steps,
        }

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (blocks in use stay in use). Returns True."""
        if isinstance(self.kv_cache, KVCacheManager):  # other allocators have no prefix cache
            self.kv_cache.reset_prefix_cache()
        return True

    # -- observation (public, read-only: benchmarks use these instead of the components) --

    def kv_usage(self, next_request: tuple[int, int] | None = None) -> KVUsage:
        """Where every KV token slot is now (token states, reservations, fragmentation, free).

        ``next_request``: (prompt length, max tokens) of a request not yet submitted, counted as
        the next to be admitted when nothing is waiting (for external fragmentation).
        """
        return self.scheduler.kv_usage(next_request)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block takes on this rank, K and V of every layer."""
        return kv_bytes_per_block(self.arch, self.config.cache.block_size, self.dtype, self.num_local_kv_heads)

    def model_info(self) -> ModelInfo:
        """The model's architecture, dtype and attention path, for tools that size or label things."""
        kernel = bool(getattr(self.attention, "use_kernel", False))
        return ModelInfo(self.arch, self.dtype, self.num_local_kv_heads, kernel)

    def linear_traffic(self, rows: int) -> tuple[int, int]:
        """(weight bytes read, multiply-add FLOPs) of every linear layer (LM head included) for a ``rows``-row step."""
        return self.model.linear_traffic(rows)

    def comm_stats(self) -> dict[str, int]:
        """Tensor-parallel traffic so far (bytes and calls per collective); zeros with one rank."""
        return dict(vars(self.group.stats))
