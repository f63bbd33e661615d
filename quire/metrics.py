"""The engine's Prometheus metrics (vLLM's names, ``quire:`` prefix) and the periodic log line.

Everything lives in one ``CollectorRegistry`` owned by an ``EngineMetrics`` object, never in
``prometheus_client``'s global default registry, so several servers (or tests) can coexist in
one process. The async engine feeds it from its step thread (``prometheus_client`` is
thread-safe); the server exports ``render()`` at ``/metrics``.

Figures are derived from ``LLMEngine.stats()`` deltas and from finished ``RequestOutput``s, so
the engine itself needs no knowledge of Prometheus. The keys looked up are listed in
``STATS_KEYS``; a key an engine does not report reads as 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from quire.engine.admission import REJECTION_REASONS
from quire.outputs import RequestOutput

logger = logging.getLogger("quire.metrics")

PREFIX = "quire:"

# The LLMEngine.stats() keys read here; missing ones read as 0.
STATS_KEYS = {
    "running": "num_running",
    "waiting": "num_waiting",
    "swapped": "num_swapped",
    "kv_blocks": "num_kv_blocks",
    "free_kv_blocks": "num_free_kv_blocks",
    "host_blocks": "num_host_blocks",
    "free_host_blocks": "num_free_host_blocks",
    "preemptions": "num_preemptions",
    "prompt_tokens": "num_prompt_tokens_computed",
    "generation_tokens": "num_generated_tokens",
    "prefix_queries": "num_prefix_cache_queries",
    "prefix_hits": "num_prefix_cache_hits",
    "spec_drafts": "num_spec_drafts",
    "spec_draft_tokens": "num_draft_tokens",
    "spec_accepted_tokens": "num_accepted_tokens",
}
# The counters fed from stats deltas (the rest of STATS_KEYS are gauges).
_COUNTED = (
    "prompt_tokens",
    "generation_tokens",
    "preemptions",
    "prefix_queries",
    "prefix_hits",
    "spec_drafts",
    "spec_draft_tokens",
    "spec_accepted_tokens",
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _get(stats: Mapping[str, int], what: str) -> int:
    return int(stats.get(STATS_KEYS[what], 0))


def kv_usage(stats: Mapping[str, int]) -> float:
    """Fraction (0..1) of the device KV blocks in use, as vLLM's ``kv_cache_usage_perc``."""
    total = _get(stats, "kv_blocks")
    return 1.0 - _get(stats, "free_kv_blocks") / total if total else 0.0


def host_usage(stats: Mapping[str, int]) -> float:
    total = _get(stats, "host_blocks")
    return 1.0 - _get(stats, "free_host_blocks") / total if total else 0.0


class EngineMetrics:
    """One registry of engine metrics, labelled with the served model name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests swapped out to host memory.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.")
        self.cpu_cache_usage_perc = gauge("cpu_cache_usage_perc", "Host (swap) KV-cache usage, 1 means 100 percent.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.spec_decode_num_drafts = counter(
            "spec_decode_num_drafts", "Speculative decoding: sequence steps that verified draft tokens."
        )
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified by the target model."
        )
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens the target model accepted."
        )
        self._requests_rejected = Counter(
            PREFIX + "num_requests_rejected",
            "Requests refused by admission control, by reason (waiting_requests, waiting_tokens, draining).",
            ["model_name", "reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # exported at 0 from the start
            self._requests_rejected.labels(model_name, reason)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends, for memory under load
        self._request_success = Counter(
            PREFIX + "request_success", "Requests finished, by reason.", ["model_name", "finished_reason"], registry=r
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean time between output tokens of a request.", _TPOT_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens (prompt and generated) per engine step.", _ITERATION_BUCKETS
        )
        self._last: dict[str, int] = {}

    # -- fed by the engine thread -------------------------------------------------------------

    def record(self, stats: Mapping[str, int], finished: Iterable[RequestOutput] = (), stepped: bool = False) -> None:
        """Update gauges from ``stats``, counters from its delta since the last call, and the
        per-request histograms from the requests that just finished."""
        self.num_requests_running.set(_get(stats, "running"))
        self.num_requests_waiting.set(_get(stats, "waiting"))
        self.num_requests_swapped.set(_get(stats, "swapped"))
        self.kv_cache_usage_perc.set(kv_usage(stats))
        self.cpu_cache_usage_perc.set(host_usage(stats))
        deltas = {}
        for what in _COUNTED:
            now = _get(stats, what)
            deltas[what] = max(0, now - self._last.get(what, now))
            self._last[what] = now
        self.prompt_tokens.inc(deltas["prompt_tokens"])
        self.generation_tokens.inc(deltas["generation_tokens"])
        self.num_preemptions.inc(deltas["preemptions"])
        self.prefix_cache_queries.inc(deltas["prefix_queries"])
        self.prefix_cache_hits.inc(deltas["prefix_hits"])
        self.spec_decode_num_drafts.inc(deltas["spec_drafts"])
        self.spec_decode_num_draft_tokens.inc(deltas["spec_draft_tokens"])
        self.spec_decode_num_accepted_tokens.inc(deltas["spec_accepted_tokens"])
        if stepped:
            self.iteration_tokens.observe(deltas["prompt_tokens"] + deltas["generation_tokens"])
        for output in finished:
            self._observe_finished(output)

    def record_rejection(self, reason: str) -> None:
        """A request refused before it reached the engine (event-loop thread)."""
        self._requests_rejected.labels(self.model_name, reason).inc()

    def start(self, stats: Mapping[str, int]) -> None:
        """Take ``stats`` as the baseline: counters count from here."""
        for what in _COUNTED:
            self._last[what] = _get(stats, what)
        self.record(stats)

    def _observe_finished(self, output: RequestOutput) -> None:
        reasons = [c.finish_reason for c in output.outputs]
        if "abort" in reasons:
            return
        reason = "length" if "length" in reasons and "stop" not in reasons else "stop"
        self._request_success.labels(self.model_name, reason).inc()
        m = output.metrics
        arrival, first, done = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        scheduled = m.get("first_scheduled_time")
        if arrival is None or done is None:
            return
        self.e2e_request_latency.observe(max(0.0, done - arrival))
        if scheduled is not None:
            self.request_queue_time.observe(max(0.0, scheduled - arrival))
        if first is not None:
            self.time_to_first_token.observe(max(0.0, first - arrival))
            num_tokens = max(len(c.token_ids) for c in output.outputs)
            if num_tokens > 1:
                self.time_per_output_token.observe(max(0.0, done - first) / (num_tokens - 1))

    # -- export -------------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatLogger:
    """Logs one line per interval while the engine is busy, like vLLM's:

    ``Avg prompt throughput: 12.3 tokens/s, Avg generation throughput: 45.6 tokens/s, Running: 3 reqs,
    Swapped: 0 reqs, Pending: 1 reqs, KV cache usage: 12.5%, CPU KV cache usage: 0.0%,
    Prefix cache hit rate: 0.0%``
    """

    def __init__(self, interval: float = 10.0, log=logger.info) -> None:
        self.interval = interval
        self.log = log
        self._last_time: float | None = None
        self._last: dict[str, int] = {}
        self._idle_logged = True

    def maybe_log(self, stats: Mapping[str, int], now: float | None = None, force: bool = False) -> str | None:
        now = time.monotonic() if now is None else now
        if self._last_time is None:
            self._reset(stats, now)
            return None
        if not force and now - self._last_time < self.interval:
            return None
        busy = _get(stats, "running") + _get(stats, "waiting") + _get(stats, "swapped") > 0
        changed = _get(stats, "generation_tokens") != self._last.get("generation_tokens") or _get(
            stats, "prompt_tokens"
        ) != self._last.get("prompt_tokens")
        if not busy and not changed and self._idle_logged:
            self._reset(stats, now)
            return None
        elapsed = max(now - self._last_time, 1e-9)
        prompt = (_get(stats, "prompt_tokens") - self._last["prompt_tokens"]) / elapsed
        gen = (_get(stats, "generation_tokens") - self._last["generation_tokens"]) / elapsed
        queries = _get(stats, "prefix_queries")
        hit_rate = _get(stats, "prefix_hits") / queries if queries else 0.0
        line = (
            f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {gen:.1f} tokens/s, "
            f"Running: {_get(stats, 'running')} reqs, Swapped: {_get(stats, 'swapped')} reqs, "
            f"Pending: {_get(stats, 'waiting')} reqs, KV cache usage: {100 * kv_usage(stats):.1f}%, "
            f"CPU KV cache usage: {100 * host_usage(stats):.1f}%, Prefix cache hit rate: {100 * hit_rate:.1f}%"
        )
        drafted = _get(stats, "spec_draft_tokens") - self._last["spec_draft_tokens"]
        if drafted > 0:
            accepted = _get(stats, "spec_accepted_tokens") - self._last["spec_accepted_tokens"]
            line += f", Draft acceptance rate: {100 * accepted / drafted:.1f}%"
        self.log(line)
        self._idle_logged = not busy
        self._reset(stats, now)
        return line

    def _reset(self, stats: Mapping[str, int], now: float) -> None:
        self._last_time = now
        keys = ("prompt_tokens", "generation_tokens", "spec_draft_tokens", "spec_accepted_tokens")
        self._last = {k: _get(stats, k) for k in keys}


def acceptance_rate(stats: Mapping[str, int]) -> float | None:
    """Speculative decoding: accepted draft tokens per draft token verified (None before any draft)."""
    drafted = _get(stats, "spec_draft_tokens")
    return _get(stats, "spec_accepted_tokens") / drafted if drafted else None


__all__ = ["CONTENT_TYPE", "EngineMetrics", "StatLogger", "acceptance_rate", "kv_usage"]
