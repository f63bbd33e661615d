"""The engine for the server: a background thread runs ``step()``; each request streams its outputs.

``LLMEngine`` is CPU-bound torch and not thread-safe, so exactly one thread, the *step thread*,
ever touches it. The asyncio side talks to it through a command queue (add, abort, or any
callable) guarded by a condition variable; the step thread drains the queue between steps,
runs ``step()`` while there is work and sleeps otherwise. Outputs go back to the event loop in
one ``call_soon_threadsafe`` per step and land in per-request ``asyncio.Queue``s; ``generate()``
reads one queue as an async iterator. Outputs are cumulative, so a slow reader only ever sees
the latest one (older ones still queued are skipped).

Leaving ``generate()`` early (the client went away, the task was cancelled) aborts the request,
which frees its KV blocks on the step thread. So does dropping an output queue unread (a response
that never started streaming): the engine keeps only a weak reference to each queue, and a
finalizer aborts the request when the queue is garbage-collected before its request finished.

If ``step()`` raises, the engine is dead: every in-flight request fails with ``EngineDeadError``,
new ones are refused and ``check_health()`` raises, so the server's ``/health`` turns non-200.
A failure in one request's own processing (its output carries an ``error``) fails that request
only, with ``RequestFailedError``.

New requests pass ``AdmissionControl`` (a bounded queue; ``RequestRejected`` past it, or while
draining for shutdown). A request given a timeout is aborted when it runs out, and its reader
gets ``RequestTimeoutError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from quire.config import EngineArgs
from quire.engine.admission import AdmissionControl, RequestRejected
from quire.engine.llm_engine import LLMEngine
from quire.metrics import EngineMetrics, StatLogger
from quire.outputs import RequestOutput
from quire.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


FEW_REQUESTS = 4  # decode steps of up to this many requests leave the event loop a core


class EngineDeadError(RuntimeError):
    """The step loop failed; the engine serves no more requests."""


class RequestFailedError(RuntimeError):
    """One request failed (its processing raised, or the server shut down before it finished); others go on."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its timeout and was aborted."""


class AsyncLLMEngine:
    """Wraps an ``LLMEngine`` for asyncio callers; start it with ``start()`` inside a running loop."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: EngineMetrics | None = None,
        log_stats_interval: float | None = 10.0,
        admission: AdmissionControl | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.admission = admission if admission is not None else AdmissionControl()
        self.stat_logger = StatLogger(log_stats_interval) if log_stats_interval else None
        self._cv = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # request id -> (weak ref to its output queue, the finalizer that aborts it if the queue is dropped)
        self._streams: dict[str, tuple[weakref.ref, weakref.finalize]] = {}
        self._deadlines: dict[str, float] = {}  # request id -> event-loop time it times out at
        self._dead: BaseException | None = None
        self._stats: dict[str, int] = engine.stats()
        self._threads = torch.get_num_threads()  # the engine's; steps with few requests use one less

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncLLMEngine:
        return cls(LLMEngine(args), **kwargs)

    # -- properties the server reads (immutable after construction) ---------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.arch.vocab_size

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def num_in_flight(self) -> int:
        """Requests added through this engine whose outputs are still being delivered."""
        return len(self._streams)

    def stats(self) -> dict[str, int]:
        """The engine's stats as of the end of the last step-thread iteration."""
        return dict(self._stats)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        if self.metrics is not None:
            self.metrics.start(self.engine.stats())
        self._thread = threading.Thread(target=self._run, name="quire-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every live request, stop the step thread and wait for it."""
        if self._thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()  # tensor-parallel workers, if any

    def begin_drain(self) -> None:
        """Refuse new requests (``RequestRejected``, reason "draining"); those in flight go on."""
        self.admission.begin_drain()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if none is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._streams and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        return not self._streams

    def fail_requests(self, error: BaseException) -> int:
        """End every request in flight: each reader gets ``error`` and the engine aborts it. Returns how many."""
        ids = list(self._streams)
        for request_id in ids:
            queue = self._streams[request_id][0]()
            if queue is not None:
                queue.put_nowait(error)
            self.cancel(request_id)
        return len(ids)

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine step failed: {self._dead!r}") from self._dead
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        self.engine.check_health()  # an idle engine too: a tensor-parallel worker may have exited

    # -- requests -----------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams | BeamSearchParams,
        arrival_time: float | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> asyncio.Queue:
        """Queue a request; returns its output queue once the engine accepted it.

        ``timeout``: seconds from now after which the request is aborted (its reader gets
        ``RequestTimeoutError``). Raises ``RequestRejected`` (the queue is full, or the server is
        draining), the engine's ``ValueError`` (invalid prompt or params) or ``EngineDeadError``.
        """
        self._raise_if_dead()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        try:
            self.admission.admit(request_id, self._num_prompt_tokens(prompt))
        except RequestRejected as exc:
            self._count_rejection(exc)
            raise
        queue: asyncio.Queue = asyncio.Queue()
        finalizer = weakref.finalize(queue, self._orphaned, request_id)
        self._streams[request_id] = (weakref.ref(queue), finalizer)
        if timeout is not None:
            self._deadlines[request_id] = asyncio.get_running_loop().time() + timeout
        arrival = time.time() if arrival_time is None else arrival_time
        try:
            await self.run_in_engine(
                lambda engine: engine.add_request(request_id, prompt, params, arrival_time=arrival, priority=priority)
            )
        except BaseException:
            # If we were cancelled after the command ran, the request exists: abort it (no-op otherwise).
            self.cancel(request_id)
            raise
        return queue

    def check_admission(self) -> None:
        """Raise ``RequestRejected`` if a new request would be refused now (cheap: before any parsing)."""
        try:
            self.admission.check()
        except RequestRejected as exc:
            self._count_rejection(exc)
            raise

    def _count_rejection(self, exc: RequestRejected) -> None:
        if self.metrics is not None:
            self.metrics.record_rejection(exc.reason)

    def _num_prompt_tokens(self, prompt: str | list[int] | dict) -> int:
        """Prompt tokens for the token bound; a text prompt is tokenized only when that bound is set."""
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            prompt = ids if ids is not None else prompt.get("prompt")
        if isinstance(prompt, list | tuple):
            return len(prompt)
        if isinstance(prompt, str) and self.admission.max_waiting_tokens is not None:
            try:
                return len(self.tokenizer.encode(prompt, add_special_tokens=True))
            except Exception:  # noqa: BLE001 - text it cannot take: the engine refuses it by name
                return 0
        return 0

    async def generate(
        self,
        prompt: str | list[int] | dict,
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs until it finishes."""
        queue = await self.add_request(request_id, prompt, params, arrival_time, priority)
        async for output in self.stream(request_id, queue):
            yield output

    async def stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Yield the outputs of an added request; leaving early (or its timeout) aborts it."""
        finished = False
        deadline = self._deadlines.get(request_id)
        try:
            while True:
                if deadline is None:
                    item = await queue.get()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await queue.get()
                    except TimeoutError:
                        raise RequestTimeoutError("the request ran past its timeout and was aborted.") from None
                while not queue.empty() and not isinstance(item, BaseException) and not item.finished:
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        """Stop delivering ``request_id``'s outputs and abort it, without waiting (event-loop thread)."""
        self._forget(request_id)
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort from any thread without waiting; unknown or finished ids are ignored."""
        self._submit(lambda: self.engine.abort_request(request_id))

    async def abort(self, request_id: str) -> None:
        self._forget(request_id)
        await self.run_in_engine(lambda engine: engine.abort_request(request_id))

    def _forget(self, request_id: str) -> None:
        self.admission.release(request_id)
        self._deadlines.pop(request_id, None)
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[1].detach()

    def _orphaned(self, request_id: str) -> None:
        """The queue of an unfinished request was garbage-collected unread: abort the request."""
        self.abort_nowait(request_id)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._forget, request_id)

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the step thread, between steps, and return its result."""
        return await asyncio.wrap_future(self._call(fn))

    def run_in_engine_sync(self, fn: Callable[[LLMEngine], T], timeout: float | None = None) -> T:
        """``run_in_engine`` for plain threads (tests, tools): blocks until it ran."""
        return self._call(fn).result(timeout)

    # -- the step thread ----------------------------------------------------------------------

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine step failed: {self._dead!r}")
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")

    def _call(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self._dead is not None:
                future.set_exception(EngineDeadError(f"engine step failed: {self._dead!r}"))
                return
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        if not self._submit(command):
            future.set_exception(EngineDeadError("the engine loop is not running"))
        return future

    def _submit(self, command: Callable[[], None]) -> bool:
        with self._cv:
            if self._stopping or self._thread is None or self._dead is not None:
                return False
            self._commands.append(command)
            self._cv.notify()
            return True

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                    self._cv.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for command in commands:
                command()
            if stopping:
                self._abort_all()
                self._publish([], stepped=False)
                return
            outputs: list[RequestOutput] = []
            stepped = engine.has_unfinished_requests()
            if stepped:
                torch.set_num_threads(self._step_threads())
                try:
                    outputs = engine.step()
                except BaseException as exc:  # noqa: BLE001 - the engine is now in an unknown state
                    logger.exception("engine step failed; failing every in-flight request")
                    self._die(exc)
                    return
            self._publish(outputs, stepped)

    def _step_threads(self) -> int:
        """Intra-op threads for the next step. The event loop (one SSE event a token) and the clients
        run beside the step: a decode step of few requests is short, and a step thread they
        preempt stalls each of its parallel regions, so such steps leave them a core (2 cores:
        one stream 14.9 -> 8.7 ms a token, four 14.7 -> 12.4); steps with prompts to prefill, or
        many requests, use every thread."""
        engine = self.engine
        if self._threads > 1 and not engine.num_waiting_requests() and engine.num_unfinished_requests() <= FEW_REQUESTS:
            return self._threads - 1
        return self._threads

    def _publish(self, outputs: list[RequestOutput], stepped: bool) -> None:
        stats = self.engine.stats()
        self._stats = stats
        if self.metrics is not None:
            self.metrics.record(stats, [o for o in outputs if o.finished], stepped=stepped)
        if self.stat_logger is not None:
            self.stat_logger.maybe_log(stats)
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)

    def _die(self, exc: BaseException) -> None:
        with self._cv:
            self._dead = exc
            pending, self._commands = self._commands, []
        for command in pending:  # let their futures fail instead of hanging
            command()
        try:
            self._abort_all()
        except Exception:  # noqa: BLE001
            logger.exception("could not abort requests after the failure")
        self._stats = self.engine.stats()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    # -- event loop side ----------------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            entry = self._streams.get(output.request_id)
            queue = entry[0]() if entry is not None else None
            if queue is None:
                continue
            self.admission.release(output.request_id)  # it has started: no longer queued
            if output.error is not None:
                queue.put_nowait(RequestFailedError(f"the request failed: {output.error}"))
                self._forget(output.request_id)
                continue
            queue.put_nowait(output)
            if output.finished:
                self._forget(output.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        if isinstance(exc, EngineDeadError):
            error = exc
        else:
            error = EngineDeadError(f"engine step failed: {exc!r}")
            error.__cause__ = exc
        for request_id, (ref, _) in list(self._streams.items()):
            queue = ref()
            if queue is not None:
                queue.put_nowait(error)
            self._forget(request_id)
