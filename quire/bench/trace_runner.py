"""Serve one request trace through the real scheduler under one KV allocator, and account for its memory.

The same loop drives two executors:

* ``SimulatedExecutor``: Quire's ``Scheduler`` with the allocator, no model; each step's
  duration comes from a ``StepTimeModel`` and every scheduled sequence that samples gets one
  token (outputs are exactly the trace's lengths, as with ``ignore_eos``).
* ``EngineExecutor``: a real ``LLMEngine`` built with the allocator (``EngineArgs.kv_allocator``),
  driven through its public API (``add_request``, ``step``, a step observer, ``kv_usage``); each
  step's duration is its wall time.

Time is a virtual clock advanced by step durations; when nothing is running it jumps to the
next arrival (identical to waiting in real time, without the wait). After every step the
allocator's ``usage`` splits the KV slots into token states / reservation / internal /
external fragmentation / free; shares and the batch size are averaged weighted by step time,
over the measurement window: from the start until every request has arrived *and* been
admitted, or until the first request finishes if that is later (an all-at-once trace that fits
at once is admitted in the first step). That is the loaded part of the run; the drain after it
(fewer and fewer requests left) would dilute every system's figures by an amount that depends
only on the trace's end.

Static batching (``static_batch``): requests that arrived wait outside the engine and are let
in ``static_batch`` at a time, only when the previous batch has completely finished. In a
simulation the members that finished early keep costing a decode row each step (the batch
computes padding for them); the real engine drops them from the compute, which flatters the
baseline.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from quire.bench.datasets import TraceRequest
from quire.bench.step_model import StepSample, StepTimeModel
from quire.config import SchedulerConfig
from quire.core.kv_allocator import KVAllocator, KVUsage
from quire.core.request import Request
from quire.core.request import Sequence as Seq
from quire.core.reservation_allocator import StaticBatchAllocator
from quire.core.scheduler import Scheduler, SchedulerOutput
from quire.sampling_params import SamplingParams

__all__ = ["EngineExecutor", "MemoryShares", "SimulatedExecutor", "TraceRunResult", "run_trace"]


@dataclass(frozen=True)
class StepOutcome:
    output: SchedulerOutput
    seconds: float
    finished: list[str]  # request ids
    batched_tokens: int
    attended_tokens: int


class Executor(Protocol):
    def add(self, request_id: str, request: TraceRequest) -> None: ...

    def step(self) -> StepOutcome: ...

    def has_unfinished_requests(self) -> bool: ...

    def num_waiting_requests(self) -> int: ...

    def kv_usage(self, next_request: tuple[int, int] | None) -> KVUsage: ...

    def num_preemptions(self) -> int: ...


def _shape(out: SchedulerOutput) -> tuple[int, int]:
    """(batched tokens, attended K/V positions) of a step, read after its tokens were marked computed."""
    return out.num_batched_tokens, sum(c.seq.num_computed_tokens for c in out.scheduled)


class SimulatedExecutor:
    """Quire's scheduler over ``allocator``, without a model: steps take ``step_model`` seconds.

    Static batching's finished members still cost a decode row each step (the batch computes
    padding for them), which ``step_model`` is told.
    """

    def __init__(self, allocator: KVAllocator, config: SchedulerConfig, step_model: StepTimeModel) -> None:
        self.allocator = allocator
        self.scheduler = Scheduler(config, allocator)
        self.step_model = step_model
        self._next_id = 0

    def add(self, request_id: str, request: TraceRequest) -> None:
        prompt = list(request.prompt_token_ids)
        seq = Seq(seq_id=self._next_id, index=0, token_ids=list(prompt), num_prompt_tokens=len(prompt))
        req = Request(
            request_id=request_id,
            prompt=None,
            prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=request.output_len, ignore_eos=True),
            arrival_order=self._next_id,
            arrival_time=request.arrival_time,
            seqs=[seq],
            eos_token_id=None,
        )
        self._next_id += 1
        self.scheduler.add_request(req)

    def step(self) -> StepOutcome:
        idle = self.allocator.held_lengths() if isinstance(self.allocator, StaticBatchAllocator) else []
        out = self.scheduler.schedule()
        if out.is_empty:
            raise RuntimeError("the scheduler scheduled nothing although requests are unfinished")
        done: dict[str, Request] = {}
        for chunk in out.scheduled:
            samples = chunk.samples
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            if samples:
                seq.token_ids.append(seq.token_ids[-1])  # the id is never read; only the count matters
                if seq.num_output_tokens >= chunk.request.params.max_tokens:
                    seq.finish_reason = "length"
                    done[chunk.request.request_id] = chunk.request
        tokens, attended = _shape(out)
        seconds = self.step_model.seconds(tokens + len(idle), attended + sum(idle))
        for request in done.values():
            self.scheduler.finish_request(request)
        return StepOutcome(out, seconds, list(done), tokens, attended)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def num_waiting_requests(self) -> int:
        return len(self.scheduler.waiting)

    def kv_usage(self, next_request: tuple[int, int] | None) -> KVUsage:
        return self.scheduler.kv_usage(next_request)

    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions


class EngineExecutor:
    """A real ``LLMEngine`` (built with the allocator under test), driven through its public API.

    Each step's schedule comes from a step observer; its duration is the wall time of ``step``.
    Requests are greedy with ``ignore_eos`` so outputs have exactly the trace's lengths.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self._last: SchedulerOutput | None = None
        self._preemptions_before = engine.stats()["num_preemptions"]
        engine.add_step_observer(self._record)

    def _record(self, record) -> None:
        self._last = record.scheduler_output

    def add(self, request_id: str, request: TraceRequest) -> None:
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0)
        self.engine.add_request(request_id, list(request.prompt_token_ids), params)

    def step(self) -> StepOutcome:
        self._last = None
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        out = self._last
        if out is None or out.is_empty:
            raise RuntimeError("the scheduler scheduled nothing although requests are unfinished")
        tokens, attended = _shape(out)
        return StepOutcome(out, seconds, [o.request_id for o in outputs if o.finished], tokens, attended)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def num_waiting_requests(self) -> int:
        return self.engine.num_waiting_requests()

    def kv_usage(self, next_request: tuple[int, int] | None) -> KVUsage:
        return self.engine.kv_usage(next_request)

    def num_preemptions(self) -> int:
        return self.engine.stats()["num_preemptions"] - self._preemptions_before


@dataclass(frozen=True)
class MemoryShares:
    """Time-averaged shares of the KV budget (fractions summing to 1)."""

    token_states: float
    reserved: float
    internal_frag: float
    external_frag: float
    free: float


@dataclass
class TraceRunResult:
    allocator: str
    num_requests: int
    duration_s: float  # virtual time until the last request finished
    window_s: float  # the window the averages cover (until the last admission, at least to the first finish)
    shares: MemoryShares
    mean_batched_requests: float  # time-averaged requests in a step
    request_throughput: float  # requests / duration
    output_throughput: float  # output tokens / duration
    mean_normalized_latency: float  # mean over requests of (finish - arrival) / output tokens, s/token
    num_steps: int
    num_preemptions: int
    kv_slots: int
    steps: list[StepSample] = field(default_factory=list, repr=False)


def run_trace(
    name: str,
    trace: Sequence[TraceRequest],
    executor: Executor,
    static_batch: int | None = None,
    on_finish: Callable[[int], None] | None = None,
) -> TraceRunResult:
    """Serve ``trace`` (sorted by arrival) to completion; ``on_finish(n)`` is told of completions (progress)."""
    pending = deque(enumerate(trace))
    outside: deque[tuple[int, TraceRequest]] = deque()  # arrived, held back by static batching
    lengths: dict[str, TraceRequest] = {}
    clock = 0.0
    window_end = math.inf  # set once the last request has been admitted and one has finished
    admitted_all = False
    sums = {"token_states": 0.0, "reserved": 0.0, "internal_frag": 0.0, "external_frag": 0.0, "free": 0.0}
    weight = batch_sum = 0.0
    latencies: list[float] = []
    steps: list[StepSample] = []
    output_tokens = 0
    capacity = 0

    def release(index: int, request: TraceRequest) -> None:
        request_id = f"{name}-{index}"
        lengths[request_id] = request
        executor.add(request_id, request)

    while pending or outside or executor.has_unfinished_requests():
        while pending and pending[0][1].arrival_time <= clock:
            index, request = pending.popleft()
            if static_batch is None:
                release(index, request)
            else:
                outside.append((index, request))
        if static_batch is not None and not executor.has_unfinished_requests():
            for _ in range(min(static_batch, len(outside))):
                release(*outside.popleft())
        if not executor.has_unfinished_requests():
            clock = pending[0][1].arrival_time
            continue
        outcome = executor.step()
        steps.append(StepSample(outcome.batched_tokens, outcome.attended_tokens, outcome.seconds))
        if clock < window_end:
            held = outside[0][1] if outside else None  # the next one in, when nothing waits inside
            snap = executor.kv_usage((held.prompt_len, held.output_len) if held is not None else None)
            capacity = snap.capacity
            dt = outcome.seconds
            weight += dt
            for key in sums:
                sums[key] += dt * getattr(snap, key) / snap.capacity
            batch_sum += dt * len({c.request.request_id for c in outcome.output.scheduled})
        clock += outcome.seconds
        admitted_all = admitted_all or not (pending or outside or executor.num_waiting_requests())
        if math.isinf(window_end) and admitted_all and (outcome.finished or latencies):
            window_end = clock
        for request_id in outcome.finished:
            request = lengths.pop(request_id)
            latencies.append((clock - request.arrival_time) / request.output_len)
            output_tokens += request.output_len
        if on_finish is not None and outcome.finished:
            on_finish(len(outcome.finished))

    weight = weight or 1.0
    return TraceRunResult(
        allocator=name,
        num_requests=len(trace),
        duration_s=clock,
        window_s=min(clock, window_end),
        shares=MemoryShares(**{k: v / weight for k, v in sums.items()}),
        mean_batched_requests=batch_sum / weight,
        request_throughput=len(latencies) / clock if clock else 0.0,
        output_throughput=output_tokens / clock if clock else 0.0,
        mean_normalized_latency=sum(latencies) / len(latencies),
        num_steps=len(steps),
        num_preemptions=executor.num_preemptions(),
        kv_slots=capacity,
        steps=steps,
    )
