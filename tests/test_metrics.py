"""Prometheus metrics and the periodic stats line, fed with hand-made engine stats (no model)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from quire.metrics import EngineMetrics, StatLogger
from quire.outputs import CompletionOutput, RequestOutput


def _stats(**kw) -> dict[str, int]:
    base = {
        "num_running": 0, "num_waiting": 0, "num_kv_blocks": 100, "num_free_kv_blocks": 100,
        "num_preemptions": 0, "num_prompt_tokens_computed": 0, "num_generated_tokens": 0,
    }
    base.update(kw)
    return base


def _samples(metrics: EngineMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _finished(reason: str, tokens: int, arrival=100.0, scheduled=100.5, first=101.0, done=103.0) -> RequestOutput:
    out = CompletionOutput(0, "x", list(range(tokens)), 0.0, None, finish_reason=reason)
    metrics = {"arrival_time": arrival, "first_scheduled_time": scheduled, "first_token_time": first,
               "finished_time": done}
    return RequestOutput("r", "p", [1, 2], None, [out], True, metrics)


def test_metrics_follow_stats_deltas_and_finished_requests():
    m = EngineMetrics("m")
    m.start(_stats(num_prompt_tokens_computed=50, num_generated_tokens=7))  # counts from here on
    m.record(
        _stats(num_running=3, num_waiting=2, num_free_kv_blocks=75, num_prompt_tokens_computed=80,
               num_generated_tokens=10, num_preemptions=1),
        [_finished("length", 5), _finished("stop", 1), _finished("abort", 3)],
        stepped=True,
    )
    s = _samples(m)
    label = (("model_name", "m"),)
    assert s[("quire:num_requests_running", label)] == 3
    assert s[("quire:num_requests_waiting", label)] == 2
    assert s[("quire:num_requests_swapped", label)] == 0
    assert s[("quire:kv_cache_usage_perc", label)] == 0.25
    assert s[("quire:cpu_cache_usage_perc", label)] == 0
    assert s[("quire:prompt_tokens_total", label)] == 30
    assert s[("quire:generation_tokens_total", label)] == 3
    assert s[("quire:num_preemptions_total", label)] == 1
    assert s[("quire:prefix_cache_queries_total", label)] == 0
    assert s[("quire:prefix_cache_hits_total", label)] == 0
    assert s[("quire:request_success_total", (("finished_reason", "length"), ("model_name", "m")))] == 1
    assert s[("quire:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 1
    assert s[("quire:iteration_tokens_total_count", label)] == 1
    assert s[("quire:iteration_tokens_total_sum", label)] == 33
    assert s[("quire:time_to_first_token_seconds_count", label)] == 2  # aborted requests are not observed
    assert s[("quire:time_to_first_token_seconds_sum", label)] == 2.0
    assert s[("quire:e2e_request_latency_seconds_sum", label)] == 6.0
    assert s[("quire:request_queue_time_seconds_sum", label)] == 1.0
    assert s[("quire:time_per_output_token_seconds_count", label)] == 1  # one token: no TPOT
    assert s[("quire:time_per_output_token_seconds_sum", label)] == 0.5


def test_registries_are_per_instance():
    a, b = EngineMetrics("a"), EngineMetrics("b")
    a.record(_stats(num_running=4))
    assert _samples(b)[("quire:num_requests_running", (("model_name", "b"),))] == 0
    assert a.registry is not b.registry


def test_stat_logger_line():
    lines: list[str] = []
    log = StatLogger(interval=5.0, log=lines.append)
    log.maybe_log(_stats(), now=0.0)
    busy = _stats(num_running=2, num_waiting=1, num_free_kv_blocks=60, num_prompt_tokens_computed=100,
                  num_generated_tokens=50)
    assert log.maybe_log(busy, now=2.0) is None  # interval not elapsed
    line = log.maybe_log(busy, now=10.0)
    assert line == (
        "Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, Running: 2 reqs, "
        "Swapped: 0 reqs, Pending: 1 reqs, KV cache usage: 40.0%, CPU KV cache usage: 0.0%, "
        "Prefix cache hit rate: 0.0%"
    )
    idle = _stats(num_prompt_tokens_computed=100, num_generated_tokens=60)
    assert log.maybe_log(idle, now=20.0) is not None  # the step down to idle is logged once
    assert log.maybe_log(idle, now=30.0) is None  # then silence while idle
    assert len(lines) == 2
