"""The engine: requests in, one scheduled model step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from quire.attention.torch_backend import TorchAttentionBackend
from quire.config import EngineArgs, EngineConfig
from quire.core.allocator_registry import build_kv_allocator
from quire.core.kv_allocator import KVUsage
from quire.core.kv_cache_manager import KVCacheManager
from quire.core.request import Request, Sequence
from quire.core.scheduler import Scheduler
from quire.distributed.comm import TPGroup
from quire.distributed.launch import (
    COLLECTIVE_TIMEOUT,
    Rendezvous,
    WorkerDiedError,
    WorkerProcesses,
    rendezvous_for,
)
from quire.distributed.partition import head_shard
from quire.engine.detokenizer import Detokenizer
from quire.engine.model_info import ModelInfo
from quire.engine.step_record import StepObserver, StepRecord
from quire.models.loader import (
    available_memory_bytes,
    load_model_files,
    load_tokenizer,
    resolve_model_path,
)
from quire.models.registry import build_model
from quire.outputs import CompletionOutput, Logprob, RequestOutput
from quire.sampling.beam_search import BeamSearch
from quire.sampling.sampler import Sampler
from quire.sampling_params import BeamSearchParams, SamplingParams
from quire.worker.cache_engine import CacheEngine, kv_bytes_per_block
from quire.worker.model_runner import ModelRunner, PromptLogprobs, RunnerOutput
from quire.worker.step_inputs import send_stop
from quire.worker.tp_worker import TORCH_DTYPES, run_worker, threads_per_rank, worker_main

logger = logging.getLogger(__name__)

# "auto" must be the fastest dtype *at equal fidelity*. bfloat16 is ~1.5x faster here but not at
# equal fidelity: on the fidelity prompts its greedy text leaves float32's (and transformers') in
# 3 of 9 prompts within 32 tokens, and its rounding makes outputs depend on the batch (3 of 9
# differ alone vs batched). float32 matches the reference and is batch-invariant, so it is the
# default; bfloat16 is opt-in. See docs/benchmarks.md.
AUTO_DTYPE = "float32"
# Default KV budget: this share of available memory, capped.
_KV_MEMORY_FRACTION = 0.3
_KV_MEMORY_CAP_GB = 4.0


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return AUTO_DTYPE
    if dtype == "float16":
        raise ValueError("dtype 'float16' is not supported on CPU; use 'float32' or 'bfloat16'.")
    return dtype


@dataclass
class EngineStats:
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and every live request."""

    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
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
        self._ranks = _Ranks(self.group, self.workers, torch.get_num_threads())
        self._finalizer = weakref.finalize(self, self._ranks.stop)
        try:
            self._build(args, path, rendezvous)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, args: EngineArgs, path: str, rendezvous: Rendezvous | None) -> None:
        if rendezvous is not None:
            self.group = self._ranks.group = TPGroup.connect(
                rendezvous.init_method, 0, rendezvous.size, COLLECTIVE_TIMEOUT
            )
        loaded = load_model_files(path)
        self.arch = loaded.config
        dtype_name = resolve_dtype(args.dtype)
        self.dtype = TORCH_DTYPES[dtype_name]
        self.device = torch.device("cpu")
        if args.num_threads or args.tensor_parallel_size > 1:
            torch.set_num_threads(threads_per_rank(args))
        # This rank's KV heads; rank 0 holds the most, so it sizes the cache for every rank.
        self.num_local_kv_heads = len(
            head_shard(self.arch.num_heads, self.arch.num_kv_heads, self.group.size, self.group.rank).kv_heads
        )

        model_max_len = self.arch.max_position_embeddings
        if self.arch.sliding_window:  # no windowed attention: stay within the window
            model_max_len = min(model_max_len, self.arch.sliding_window)
        config = args.create_config(path, model_max_len, dtype_name)
        num_blocks = self._num_kv_blocks(config)
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        max_model_len = config.scheduler.max_model_len
        if capacity < max_model_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, max_model_len)
            max_model_len = capacity
        self.max_model_len = max_model_len
        self.config = config
        num_host_blocks = self._num_host_blocks(config)
        if self.group.size > 1:
            dtype_code = list(TORCH_DTYPES).index(dtype_name)
            self.group.broadcast(torch.tensor([num_blocks, block_size, max_model_len, dtype_code, num_host_blocks]))

        self.cache = CacheEngine(
            self.arch,
            num_blocks,
            block_size,
            self.dtype,
            self.device,
            self.num_local_kv_heads,
            num_host_blocks,
            back_now=False,
        )
        # Backing the pool's pages takes seconds (CacheEngine.back_pages); a thread does it (torch
        # releases the GIL) while the tokenizer, mostly Python, and the model load.
        with ThreadPoolExecutor(1, thread_name_prefix="quire-kv-pages") as pool:
            backing = pool.submit(self.cache.back_pages)
            self.tokenizer = load_tokenizer(path)
            self.attention = TorchAttentionBackend()
            self.model = build_model(loaded, self.attention, self.dtype, max_model_len, self.device, self.group)
            del loaded
            backing.result()

        self.kv_cache = build_kv_allocator(
            config.cache.kv_allocator,
            num_blocks,
            block_size,
            max_model_len,
            config.cache.enable_prefix_caching,
            num_host_blocks,
        )
        self._step_observers: list[StepObserver] = []
        scheduler_config = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache)
        generator = torch.Generator().manual_seed(config.model.seed)
        sampler = Sampler(generator, self.model.ops.kernels)
        self.runner = ModelRunner(self.model, self.cache, sampler, self.device, self.group)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_id = self._eos_token_id()
        self.requests: dict[str, Request] = {}
        self.stats_counters = EngineStats()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._token_text: dict[int, str] = {}

    # -- set-up helpers -----------------------------------------------------------------

    def _num_kv_blocks(self, config: EngineConfig) -> int:
        cache = config.cache
        per_block = kv_bytes_per_block(self.arch, cache.block_size, self.dtype, self.num_local_kv_heads)
        available = available_memory_bytes()
        if cache.num_kv_blocks is not None:
            num_blocks, field = cache.num_kv_blocks, f"num_kv_blocks={cache.num_kv_blocks}"
        else:
            if cache.kv_cache_memory_gb is not None:
                budget = cache.kv_cache_memory_gb * 2**30
            else:
                budget = min(_KV_MEMORY_FRACTION * available, _KV_MEMORY_CAP_GB * 2**30)
            num_blocks, field = int(budget // per_block), f"kv_cache_memory_gb={cache.kv_cache_memory_gb}"
            if num_blocks < 1:
                raise ValueError(f"{field} is too small for one KV block.")
        # The whole pool is written at start-up (CacheEngine.back_pages): one larger than the memory
        # left would have the OS kill the process there, so refuse it with a clear error instead.
        if self.device.type == "cpu" and num_blocks * per_block > available:
            raise ValueError(
                f"{field}: a KV pool of {num_blocks * per_block / 2**30:.2f} GiB does not fit in the "
                f"{available / 2**30:.2f} GiB of memory available."
            )
        return num_blocks

    def _num_host_blocks(self, config: EngineConfig) -> int:
        cache = config.cache
        if cache.num_host_kv_blocks is not None:
            return cache.num_host_kv_blocks
        per_block = kv_bytes_per_block(self.arch, cache.block_size, self.dtype, self.num_local_kv_heads)
        return int(cache.swap_space_gb * 2**30 // per_block)

    def _eos_token_id(self) -> int | None:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return self.arch.eos_token_ids[0] if self.arch.eos_token_ids else None

    # -- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams | BeamSearchParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> Request:
        """Queue a request. ``params`` is a ``SamplingParams`` (``n`` / ``best_of`` sequences) or a
        ``BeamSearchParams`` (beam search; its output comes when the search ends). A prompt dict
        may carry a ``cache_salt``: only requests with the same salt share prefix-cache blocks.
        """
        params = params or SamplingParams()
        beam_params = None
        if isinstance(params, BeamSearchParams):
            beam_params = params
            params = SamplingParams(
                temperature=0.0,
                max_tokens=params.max_tokens,
                ignore_eos=params.ignore_eos,
                logprobs=2 * params.beam_width,
            )
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and self.scheduler.config.policy != "priority":
            raise ValueError(f"priority={priority} needs scheduling_policy='priority' (the engine uses 'fcfs').")
        group_size = beam_params.beam_width if beam_params is not None else params.num_seqs
        limits = self.scheduler.config
        name = "beam_width" if beam_params is not None else "best_of" if params.best_of is not None else "n"
        if group_size > min(limits.max_num_seqs, limits.max_num_batched_tokens):
            raise ValueError(
                f"{name}={group_size} is more sequences than the engine runs at once "
                f"(max_num_seqs={limits.max_num_seqs}, max_num_batched_tokens={limits.max_num_batched_tokens})."
            )
        text, token_ids = self._tokenize_prompt(prompt)
        if group_size > 1:
            self._check_group_fits(len(token_ids), group_size, params.max_tokens, name)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        generators = None
        if params.seed is not None:  # sequence i draws from seed + i (vLLM's convention)
            generators = [torch.Generator().manual_seed(params.seed + i) for i in range(group_size)]
        seq = Sequence(seq_id=next(self._seq_ids), index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
        if params.logprobs is not None and beam_params is None:
            seq.logprobs = []
        self.detokenizer.start(seq)
        beam = None
        if beam_params is not None:
            max_new = min(beam_params.max_tokens, max(1, self.max_model_len - len(token_ids)))
            beam = BeamSearch(beam_params, None if beam_params.ignore_eos else self.eos_token_id, max_new)
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=list(token_ids),
            params=params,
            arrival_order=next(self._arrivals),
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            seqs=[seq],
            eos_token_id=self.eos_token_id,
            priority=priority,
            group_size=group_size,
            generators=generators,
            beam=beam,
            cache_salt=salt,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        return request

    def _check_group_fits(self, prompt_len: int, group_size: int, max_tokens: int | None, name: str) -> None:
        """A group must fit in the whole pool even unshared (as after a recompute), or it could never finish."""
        if not isinstance(self.kv_cache, KVCacheManager):
            raise ValueError(f"{name}={group_size} needs shared KV blocks: kv_allocator must be 'paged'.")
        block_size = self.kv_cache.block_size
        longest = min(prompt_len + (max_tokens or self.max_model_len), self.max_model_len)
        needed = group_size * -(-longest // block_size)
        if needed > self.kv_cache.pool.num_blocks:
            raise ValueError(
                f"{name}={group_size} sequences of up to {longest} tokens may need {needed} KV blocks, more than "
                f"the {self.kv_cache.pool.num_blocks} in the cache; lower {name} or max_tokens."
            )

    def _tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                text, token_ids = prompt["prompt"], None
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'.")
        elif isinstance(prompt, str):
            text, token_ids = prompt, None
        elif isinstance(prompt, list | tuple):
            text, token_ids = None, prompt
        else:
            raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}.")
        if token_ids is None:
            if not isinstance(text, str):
                raise ValueError("prompt must be a string.")
            token_ids = self.tokenizer.encode(text, add_special_tokens=True)
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token.")
        vocab = self.arch.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}).")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt is too long: {len(token_ids)} tokens, max_model_len is {self.max_model_len}.")
        return text, token_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request from whatever state it is in; its blocks in both pools are free on return."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.unfinished_seqs:
            seq.finish_reason = "abort"
        if request.beam is not None:
            request.beam.done = True
        self.scheduler.finish_request(request)
        return self._make_output(request)

    abort = abort_request

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
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        scheduled = time.perf_counter()
        if sched.is_empty:
            self._notify_step_observers(sched, None, started, scheduled, scheduled)
            return []
        scheduled_at = time.time()
        for entry in sched.scheduled:  # queue time, for the server's metrics
            entry.request.metrics.setdefault("first_scheduled_time", scheduled_at)
        result = self._execute(sched)
        executed = time.perf_counter()
        stats = self.stats_counters
        stats.num_steps += 1
        for entry in sched.scheduled:
            if entry.seq.num_computed_tokens < entry.seq.num_prompt_tokens or not entry.samples:
                stats.num_prompt_tokens_computed += entry.num_new_tokens
            entry.seq.num_computed_tokens += entry.num_new_tokens
        self._record_prompt_logprobs(result)

        touched: dict[str, Request] = {}
        if result.samples is not None:
            now = time.time()
            samples = result.samples
            tokens = samples.token_ids.tolist()
            logprobs = samples.logprobs.tolist()
            ranks = samples.ranks.tolist() if samples.ranks is not None else None
            top_ids = samples.top_token_ids.tolist() if samples.top_token_ids is not None else None
            top_lps = samples.top_logprobs.tolist() if samples.top_logprobs is not None else None
            beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
            sampled = result.sampled_seqs
            row = 0
            while row < len(sampled):
                entry = sampled[row]
                request, seq = entry.request, entry.seq
                count = 1  # a forking prompt sequence has one row per child, consecutive
                while row + count < len(sampled) and sampled[row + count] is entry:
                    count += 1
                if request.first_token_time is None:
                    request.first_token_time = now
                touched[request.request_id] = request
                if request.beam is not None:
                    beam_rows.setdefault(request.request_id, []).append((seq, row))
                    row += count
                    continue
                # Fork before appending: the children copy the parent's state without the new token.
                children = [seq] + [self._fork(seq, index) for index in range(1, count)]
                request.seqs += children[1:]
                for child in children:
                    child.token_ids.append(tokens[row])
                    child.cumulative_logprob += logprobs[row]
                    if child.logprobs is not None:
                        k = request.params.logprobs
                        child.logprobs.append(
                            self._position_logprobs(
                                tokens[row],
                                logprobs[row],
                                ranks[row],
                                top_ids[row][:k] if k else [],
                                top_lps[row][:k] if k else [],
                            )
                        )
                    stats.num_generated_tokens += 1
                    self._check_stop(request, child)
                    row += 1
            for request_id, rows in beam_rows.items():
                self._beam_step(touched[request_id], rows, top_ids, top_lps)

        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finished_time = time.time()
                self.scheduler.finish_request(request)
                del self.requests[request.request_id]
            elif len(request.seqs) > 1:
                for seq in request.seqs:  # a finished member of a group gives its blocks back at once
                    if seq.is_finished:
                        self.kv_cache.free(seq.seq_id)
            if request.beam is None or request.is_finished:
                outputs.append(self._make_output(request))
        self._notify_step_observers(sched, result, started, scheduled, executed)
        return outputs

    def _execute(self, sched) -> RunnerOutput:
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

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """A new sequence sharing ``parent``'s tokens, state and KV blocks (reference counts, no copy)."""
        child = dataclasses.replace(
            parent,
            seq_id=next(self._seq_ids),
            index=index,
            token_ids=list(parent.token_ids),
            logprobs=list(parent.logprobs) if parent.logprobs is not None else None,
        )
        self.kv_cache.fork(parent.seq_id, child.seq_id)
        return child

    def _beam_step(
        self, request: Request, rows: list[tuple[Sequence, int]], top_ids: list[list[int]], top_lps: list[list[float]]
    ) -> None:
        """Pick the next beams of ``request`` from its live beams' top candidates; fork and free blocks to match.

        A parent kept by several new beams is forked (its blocks shared, copied on write when the
        beams diverge inside a block); a parent kept by none releases its blocks at once.
        """
        beam = request.beam
        assert beam is not None
        parents = [seq for seq, _ in rows]
        assert parents == request.unfinished_seqs, "all live beams of a request sample in the same step"
        survivors = beam.step(
            [(seq.output_token_ids, seq.cumulative_logprob, top_ids[row], top_lps[row]) for seq, row in rows]
        )
        used: set[int] = set()
        new_beams: list[Sequence] = []
        for candidate in survivors:
            parent = parents[candidate.parent]
            if candidate.parent in used:
                new_beams.append(self._fork(parent, len(new_beams)))
            else:
                used.add(candidate.parent)
                new_beams.append(parent)
        for i, (seq, candidate) in enumerate(zip(new_beams, survivors, strict=True)):
            seq.index = i
            seq.token_ids.append(candidate.token_id)
            seq.cumulative_logprob = candidate.cum_logprob
        self.stats_counters.num_generated_tokens += len(new_beams)
        for i, parent in enumerate(parents):
            if i not in used:
                self.kv_cache.free(parent.seq_id)
        request.seqs = new_beams

    def _check_stop(self, request: Request, seq: Sequence) -> None:
        """Finish ``seq`` if its newest token ends it; detokenize what it adds to the text."""
        params = request.params
        token = seq.token_ids[-1]
        skip = params.skip_special_tokens
        may_stop = seq.num_output_tokens >= params.min_tokens
        stop_token: int | None = None
        if may_stop and token == request.eos_token_id and not params.ignore_eos:
            stop_token = token
        elif may_stop and token in params.stop_token_ids:
            stop_token = token
        if stop_token is not None:
            upto = None if params.include_stop_str_in_output else len(seq.token_ids) - 1
            self.detokenizer.update(seq, skip, upto, final=True)
            seq.finish_reason = "stop"
            seq.stop_reason = None if token == request.eos_token_id and token not in params.stop_token_ids else token
            return
        new_text = self.detokenizer.update(seq, skip)
        if may_stop and new_text and params.stop_strings:
            for stop in params.stop_strings:
                begin = max(0, len(seq.output_text) - len(new_text) - len(stop) + 1)
                at = seq.output_text.find(stop, begin)
                if at != -1:
                    end = at + len(stop) if params.include_stop_str_in_output else at
                    seq.output_text = seq.output_text[:end]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            seq.finish_reason = "length"
            self.detokenizer.update(seq, skip, final=True)

    def _decoded(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _position_logprobs(self, token, logprob, rank, top_ids, top_lps) -> dict[int, Logprob]:
        entry = {token: Logprob(logprob, rank, self._decoded(token))}
        for i, (tid, lp) in enumerate(zip(top_ids, top_lps, strict=True)):
            if tid not in entry:
                entry[tid] = Logprob(lp, i + 1, self._decoded(tid))
        return entry

    def _record_prompt_logprobs(self, result: RunnerOutput) -> None:
        if not result.prompt_logprobs:
            return
        for entry, pl in result.prompt_logprobs:
            self._append_prompt_logprobs(entry.request, pl)

    def _append_prompt_logprobs(self, request: Request, pl: PromptLogprobs) -> None:
        assert request.prompt_logprobs is not None and len(request.prompt_logprobs) == pl.first_token
        token_ids, lps, ranks = pl.token_ids.tolist(), pl.logprobs.tolist(), pl.ranks.tolist()
        top_ids = pl.top_token_ids.tolist() if pl.top_token_ids is not None else [[]] * len(token_ids)
        top_lps = pl.top_logprobs.tolist() if pl.top_logprobs is not None else [[]] * len(token_ids)
        for i, token in enumerate(token_ids):
            request.prompt_logprobs.append(self._position_logprobs(token, lps[i], ranks[i], top_ids[i], top_lps[i]))

    def _make_output(self, request: Request) -> RequestOutput:
        """The request's outputs so far.

        ``n == best_of``: every sequence, in index order (sequence ``i`` is the one seeded
        ``seed + i``). ``best_of > n``: the ``n`` sequences with the highest cumulative logprob,
        best first, re-indexed 0..n-1 (vLLM v0's choice; while running, the current best ``n``).
        Beam search: the finished hypotheses, best score first.
        """
        if request.beam is not None:
            return self._make_beam_output(request)
        seqs = request.seqs
        n = request.params.n
        if len(seqs) > n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:n]
        outputs = [
            CompletionOutput(
                index=seq.index if len(request.seqs) <= n else i,
                text=seq.output_text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(seqs)
        ]
        return self._request_output(request, outputs)

    def _make_beam_output(self, request: Request) -> RequestOutput:
        beam = request.beam
        assert beam is not None
        if beam.finished:
            hyps = [(h.token_ids, h.cum_logprob, h.score, h.finish_reason) for h in beam.finished]
        else:  # aborted before any beam finished: what the live beams hold
            hyps = [(s.output_token_ids, s.cumulative_logprob, None, "abort") for s in request.seqs]
        outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                token_ids=list(token_ids),
                cumulative_logprob=cum,
                logprobs=None,
                finish_reason=reason,
                stop_reason=None,
                score=score,
            )
            for i, (token_ids, cum, score, reason) in enumerate(hyps)
        ]
        return self._request_output(request, outputs)

    def _request_output(self, request: Request, outputs: list[CompletionOutput]) -> RequestOutput:
        metrics = {"arrival_time": request.arrival_time, **request.metrics}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        if request.finished_time is not None:
            metrics["finished_time"] = request.finished_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=request.is_finished,
            metrics=metrics,
        )

    # -- introspection ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        scheduler = self.scheduler
        return {
            **self._kv_pool_stats(),
            "num_preemptions": scheduler.num_preemptions,
            "num_preemptions_swap": scheduler.num_preemptions_by_mode["swap"],
            "num_preemptions_recompute": scheduler.num_preemptions_by_mode["recompute"],
            "num_swapped": len(scheduler.swapped),
            "num_swapped_out_blocks": scheduler.num_swapped_out_blocks,
            "num_swapped_in_blocks": scheduler.num_swapped_in_blocks,
            "num_prompt_tokens_computed": self.stats_counters.num_prompt_tokens_computed,
            "num_generated_tokens": self.stats_counters.num_generated_tokens,
            "num_steps": self.stats_counters.num_steps,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_prefix_cache_queries": self.scheduler.num_prefix_cache_queries,
            "num_prefix_cache_hits": self.scheduler.num_prefix_cache_hits,
        }

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (blocks in use stay in use). Returns True."""
        if isinstance(self.kv_cache, KVCacheManager):  # other allocators have no prefix cache
            self.kv_cache.reset_prefix_cache()
        return True

    # -- observation (public, read-only: benchmarks use these instead of the components) --

    def add_step_observer(self, fn: StepObserver) -> None:
        """Call ``fn(record)`` with a ``StepRecord`` after every step, in the order observers were added."""
        self._step_observers.append(fn)

    def _notify_step_observers(self, sched, result, started: float, scheduled: float, executed: float) -> None:
        if not self._step_observers:
            return
        end = time.perf_counter()
        record = StepRecord(sched, result, scheduled - started, executed - scheduled, end - executed)
        for fn in self._step_observers:
            fn(record)

    def kv_usage(self, next_request: tuple[int, int] | None = None) -> KVUsage:
        """Where every KV token slot is now (token states, reservations, fragmentation, free).

        ``next_request``: (prompt length, max tokens) of a request not yet submitted, counted as
        the next to be admitted when nothing is waiting (for external fragmentation).
        """
        return self.scheduler.kv_usage(next_request)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block takes on this rank, K and V of every layer."""
        return kv_bytes_per_block(self.arch, self.cache.block_size, self.dtype, self.num_local_kv_heads)

    def model_info(self) -> ModelInfo:
        """The model's architecture, dtype and attention path, for tools that size or label things."""
        kernel = bool(getattr(self.attention, "use_kernel", False))
        return ModelInfo(self.arch, self.dtype, self.num_local_kv_heads, kernel)

    def linear_traffic(self, rows: int) -> tuple[int, int]:
        """(weight bytes read, multiply-add FLOPs) of every linear layer (LM head included) for a ``rows``-row step."""
        from quire.models.linear import Linear

        layers = [m for m in self.model.modules() if isinstance(m, Linear)]
        return (
            sum(layer.weight_bytes_read(rows) for layer in layers),
            sum(2 * rows * layer.in_features * layer.out_features for layer in layers),
        )

    def comm_stats(self) -> dict[str, int]:
        """Tensor-parallel traffic so far (bytes and calls per collective); zeros with one rank."""
        return dict(vars(self.group.stats))

    def _kv_pool_stats(self) -> dict[str, int]:
        """The KV pools' figures for ``stats``; a reservation allocator has one pool, no cache, no peak record."""
        kv = self.kv_cache
        num_blocks, free = self.cache.num_blocks, kv.num_free_blocks
        paged = isinstance(kv, KVCacheManager)
        return {
            "num_kv_blocks": num_blocks,
            "num_free_kv_blocks": free,
            "peak_used_kv_blocks": kv.pool.peak_used if paged else num_blocks - free,
            "block_size": kv.block_size,
            "num_host_blocks": kv.num_host_blocks if paged else 0,
            "num_free_host_blocks": kv.num_free_host_blocks if paged else 0,
            "num_cached_kv_blocks": len(kv.pool.cached) if paged else 0,
        }


@dataclass
class _Ranks:
    """What stopping the tensor-parallel ranks needs, kept apart from the engine so a finalizer can hold it."""

    group: TPGroup
    workers: WorkerProcesses | None
    threads: int  # torch threads before the engine shared the cores among ranks
    broken: bool = False  # a collective failed: the group cannot carry a stop message

    def stop(self) -> None:
        """Tell the workers to leave their loop, wait for the spawned ones, give the threads back."""
        if self.group.size > 1 and not self.broken:
            try:
                send_stop(self.group)
            except Exception as exc:  # a dead group: the workers have exited or will on their own
                logger.debug("could not send stop to the workers: %s", exc)
        if self.workers is not None:
            self.workers.stop()
        if self.group.size > 1:
            torch.set_num_threads(self.threads)
