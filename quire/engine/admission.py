"""Admission control for the server's engine: a bounded queue, and no new work while draining.

Requests that have not produced their first token yet are the queue: they hold memory (their
prompts, their output queues, their connections) and every one of them adds to the time to first
token of those behind it. ``AdmissionControl`` bounds how many there are and how many prompt
tokens they carry; past either bound a new request is refused at once (``RequestRejected``, which
the server answers with 503 and ``Retry-After``), so a burst far above what the engine can do
costs a fast refusal each rather than unbounded memory and latency. While the server drains for
shutdown every new request is refused the same way.

It lives on the event loop (the async engine's side), so it needs no lock: a request is counted
from ``admit`` until ``release`` (its first output, or its end, whichever comes first).
A beam search reports only when it ends, so it counts as queued for its whole life.
"""

from __future__ import annotations

# What Retry-After tells a refused client: long enough for a few steps to drain the queue.
RETRY_AFTER_S = 1
# Why a request was refused (the ``reason`` label of quire:num_requests_rejected_total).
REJECTION_REASONS = ("waiting_requests", "waiting_tokens", "draining")


class RequestRejected(RuntimeError):
    """A new request refused for now; ``reason`` is "waiting_requests", "waiting_tokens" or "draining"."""

    def __init__(self, message: str, reason: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class AdmissionControl:
    """Bounds the requests waiting for their first token (count and prompt tokens); None is no bound.

    A request is admitted whenever nothing else waits, however long its prompt: every valid
    request can run eventually.
    """

    def __init__(self, max_waiting_requests: int | None = None, max_waiting_tokens: int | None = None) -> None:
        for name, value in (("max_waiting_requests", max_waiting_requests), ("max_waiting_tokens", max_waiting_tokens)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self._waiting: dict[str, int] = {}  # request id -> prompt tokens
        self._tokens = 0
        self._draining = False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_tokens(self) -> int:
        return self._tokens

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse every new request from now on (the server is shutting down)."""
        self._draining = True

    def check(self, num_tokens: int = 0) -> None:
        """Raise ``RequestRejected`` if a request of ``num_tokens`` prompt tokens would be refused now."""
        if self._draining:
            raise RequestRejected("The server is shutting down and accepts no new requests.", "draining")
        if not self._waiting:
            return
        limit = self.max_waiting_requests
        if limit is not None and len(self._waiting) >= limit:
            raise RequestRejected(
                f"The server is overloaded: {len(self._waiting)} requests are already waiting (the limit is "
                f"{limit}). Please retry later.",
                "waiting_requests",
            )
        limit = self.max_waiting_tokens
        if limit is not None and self._tokens + num_tokens > limit:
            raise RequestRejected(
                f"The server is overloaded: {self._tokens} prompt tokens are already waiting and this request "
                f"adds {num_tokens} (the limit is {limit}). Please retry later.",
                "waiting_tokens",
            )

    def admit(self, request_id: str, num_tokens: int) -> None:
        """Count the request as waiting, or raise ``RequestRejected``."""
        self.check(num_tokens)
        self._waiting[request_id] = num_tokens
        self._tokens += num_tokens

    def release(self, request_id: str) -> None:
        """The request started (or ended): it no longer waits. Unknown ids are ignored."""
        self._tokens -= self._waiting.pop(request_id, 0)
