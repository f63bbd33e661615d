"""``quire bench serve``: load-test any OpenAI-compatible server, like ``vllm bench serve``.

    quire bench serve --base-url http://127.0.0.1:8000 --request-rate 2 --num-prompts 100 \\
        --dataset sharegpt-like [--max-concurrency 8] [--ignore-eos] [--burstiness 1.0]

Requests are streamed (``stream: true`` with ``stream_options.include_usage``) to
``--endpoint`` (``/v1/completions`` or ``/v1/chat/completions``) and arrive by a gamma process
of mean rate ``--request-rate`` (shape ``--burstiness``; 1 is Poisson, ``inf`` rate sends all at
once), optionally capped at ``--max-concurrency`` in flight. Only plain HTTP and SSE are used, so
it measures any peer server; the one non-OpenAI field it may send is vLLM's ``ignore_eos`` (with
``--ignore-eos``).

Datasets are synthetic and seeded (nothing is downloaded): prompts are cut from the prose
corpus of ``quire.bench.workload``; lengths follow the shape of the paper's workloads:
``sharegpt-like`` (long prompts and outputs, means ~161 / ~338 tokens), ``alpaca-like`` (short:
~19 / ~58), ``random`` (``--random-input-len`` / ``--random-output-len`` +- ``--random-range-ratio``).
Prompt lengths are in words scaled to approximate tokens (no tokenizer needed); the token counts
reported come from the server's usage.

Reported: completed and failed requests, duration, request throughput, output and total token
throughput, and mean / median / p99 of TTFT (to the first streamed text), TPOT ((E2E - TTFT) /
(output tokens - 1)), ITL (gaps between streamed chunks) and E2E latency.

Overload: requests the server refuses with 503 or 429 (admission control) are counted as
*rejected*, apart from failures, with their latency (how fast the refusal came). When the server
exports ``process_resident_memory_bytes`` on ``/metrics`` (Quire does), its RSS before and after the
run is reported. ``--baseline-num-prompts K`` first sends K requests alone, as the unloaded
reference for the run's p99 TTFT (e.g. K = the server's ``--max-waiting-requests``: a full queue that
is not overloaded), then the run itself, e.g. a burst of 2,000 with ``--request-rate inf``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from quire.bench.workload import CORPUS

# What a server answers when its admission control refuses a request (TGI uses 429, Quire and vLLM 503).
REJECTED_STATUSES = (429, 503)
# Tokens per whitespace word for English prose (Llama-family tokenizers): to size prompts without a tokenizer.
TOKENS_PER_WORD = 1.3

DATASETS = {
    # (prompt mean, prompt sigma of log, output mean, output sigma of log, output cap)
    "sharegpt-like": (161, 0.8, 338, 0.8, 1024),
    "alpaca-like": (19, 0.5, 58, 0.6, 256),
}


@dataclass
class BenchPrompt:
    prompt: str
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    rejected: bool = False  # refused by the server's admission control (503 / 429)
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2) = mean
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def make_prompts(
    dataset: str,
    num_prompts: int,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    range_ratio: float = 0.0,
    max_output_len: int | None = None,
) -> list[BenchPrompt]:
    rng = random.Random(seed)
    words = CORPUS.split()
    prompts = []
    for _ in range(num_prompts):
        if dataset == "random":
            low_in, high_in = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
            low_out, high_out = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
            n_in, n_out = rng.randint(max(1, low_in), max(1, high_in)), rng.randint(max(1, low_out), max(1, high_out))
        elif dataset in DATASETS:
            p_mean, p_sigma, o_mean, o_sigma, cap = DATASETS[dataset]
            n_in = max(4, min(2048, round(_lognormal(rng, p_mean, p_sigma))))
            n_out = max(1, min(cap, round(_lognormal(rng, o_mean, o_sigma))))
        else:
            raise ValueError(f"unknown dataset {dataset!r}; choose sharegpt-like, alpaca-like or random.")
        if max_output_len is not None:
            n_out = min(n_out, max_output_len)
        n_words = max(1, round(n_in / TOKENS_PER_WORD))
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(n_words))
        prompts.append(BenchPrompt(text, n_out))
    return prompts


def arrival_delays(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Gaps between request arrivals: gamma(shape=burstiness) with mean 1/rate; 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * num
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]


async def _one_request(client, url: str, payload: dict, headers: dict, chat: bool) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.e2e = time.perf_counter() - start
                result.rejected = response.status_code in REJECTED_STATUSES
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        if chunks == 0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        chunks += 1
                        last = now
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
        result.e2e = time.perf_counter() - start
        if not result.output_tokens:
            result.output_tokens = chunks
        result.ok = chunks > 0 or result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _model_name(client, base_url: str, headers: dict) -> str:
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def server_rss(client, base_url: str) -> int | None:
    """The server's resident memory from its /metrics (prometheus_client's process collector), if exported."""
    try:
        response = await client.get(f"{base_url}/metrics")
    except Exception:  # noqa: BLE001 - optional: a server without /metrics
        return None
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


async def benchmark(
    args: argparse.Namespace, prompts: list[BenchPrompt], baseline: list[BenchPrompt] | None = None
) -> tuple[list[RequestResult], float, dict]:
    """Run ``prompts`` (after ``baseline``, if any, alone); returns the run's results, its duration,
    and extras: the baseline's results and the server's RSS before and after the run."""
    import httpx

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    chat = "chat" in args.endpoint
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    extras: dict = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = args.model or await _model_name(client, base_url, headers)
        url = base_url + args.endpoint
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        def payload(p: BenchPrompt) -> dict:
            body: dict = {
                "model": model,
                "max_tokens": p.output_len,
                "temperature": args.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if chat:
                body["messages"] = [{"role": "user", "content": p.prompt}]
            else:
                body["prompt"] = p.prompt
            if args.ignore_eos:
                body["ignore_eos"] = True
            return body

        async def run_one(p: BenchPrompt) -> RequestResult:
            if semaphore is None:
                return await _one_request(client, url, payload(p), headers, chat)
            async with semaphore:
                return await _one_request(client, url, payload(p), headers, chat)

        if baseline:
            extras["baseline"] = await asyncio.gather(*(run_one(p) for p in baseline))
        extras["rss_before"] = await server_rss(client, base_url)
        rng = random.Random(args.seed + 1)
        delays = arrival_delays(len(prompts), args.request_rate, args.burstiness, rng)
        start = time.perf_counter()
        tasks = []
        for p, delay in zip(prompts, delays, strict=True):
            tasks.append(asyncio.create_task(run_one(p)))
            if delay:
                await asyncio.sleep(delay)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        extras["rss_after"] = await server_rss(client, base_url)
        return list(results), duration, extras


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.99 * len(ordered)) - 1))]
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p99": p99}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    rejected = [r for r in results if r.rejected]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "completed": len(ok),
        "rejected": len(rejected),
        "failed": len(results) - len(ok) - len(rejected),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
    }
    for name, values in (
        ("ttft", [r.ttft for r in ok]),
        ("tpot", tpot),
        ("itl", [x for r in ok for x in r.itl]),
        ("e2el", [r.e2e for r in ok]),
    ):
        for stat, value in _stats(values).items():
            summary[f"{stat}_{name}_ms"] = 1000 * value
    for stat, value in _stats([r.e2e for r in rejected]).items():
        summary[f"{stat}_rejection_ms"] = 1000 * value
    errors = [r.error for r in results if not r.ok and not r.rejected]
    if errors:
        summary["first_errors"] = errors[:3]
    return summary


def add_extras(summary: dict, extras: dict) -> None:
    """The baseline's p99 TTFT (and the run's ratio to it) and the server's RSS, into ``summary``."""
    if extras.get("baseline"):
        ok = [r for r in extras["baseline"] if r.ok]
        p99 = 1000 * _stats([r.ttft for r in ok])["p99"]
        summary["baseline_completed"] = len(ok)
        summary["baseline_p99_ttft_ms"] = p99
        summary["p99_ttft_ratio"] = summary["p99_ttft_ms"] / p99 if p99 else 0.0
    for when in ("before", "after"):
        rss = extras.get(f"rss_{when}")
        summary[f"server_rss_{when}_mib"] = rss / 2**20 if rss is not None else None


def format_summary(s: dict) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", s["completed"])
    row("Rejected requests (503/429):", s.get("rejected", 0))
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        label = name.upper()
        row(f"Mean {label} (ms):", s[f"mean_{name}_ms"])
        row(f"Median {label} (ms):", s[f"median_{name}_ms"])
        row(f"P99 {label} (ms):", s[f"p99_{name}_ms"])
    if s.get("rejected"):
        lines.append("{s:{c}^50}".format(s=" Rejections (admission control) ", c="-"))
        row("Mean rejection latency (ms):", s["mean_rejection_ms"])
        row("Median rejection latency (ms):", s["median_rejection_ms"])
        row("P99 rejection latency (ms):", s["p99_rejection_ms"])
    if "baseline_p99_ttft_ms" in s:
        lines.append("{s:{c}^50}".format(s=" Unloaded baseline ", c="-"))
        row("Baseline requests (completed):", s["baseline_completed"])
        row("Baseline P99 TTFT (ms):", s["baseline_p99_ttft_ms"])
        row("P99 TTFT loaded / unloaded:", s["p99_ttft_ratio"])
    if s.get("server_rss_before_mib") is not None:
        lines.append("{s:{c}^50}".format(s=" Server memory ", c="-"))
        row("Server RSS before (MiB):", s["server_rss_before_mib"])
        row("Server RSS after (MiB):", s["server_rss_after_mib"])
    lines.append("=" * 50)
    for error in s.get("first_errors", []):
        lines.append(f"error: {error}")
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--dataset", default="sharegpt-like", choices=["sharegpt-like", "alpaca-like", "random"])
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (full-length outputs)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-input-len", type=int, default=128)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--max-output-len", type=int, default=None, help="cap every output length")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    parser.add_argument("--result-json", default=None, help="also write the summary here")
    parser.add_argument(
        "--baseline-num-prompts", type=int, default=0,
        help="first send this many requests alone: the unloaded reference for p99 TTFT (default: none)",
    )


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        print("error: --num-prompts must be >= 1", file=sys.stderr)
        return 2
    if not args.request_rate > 0 or not args.burstiness > 0:
        print("error: --request-rate and --burstiness must be > 0", file=sys.stderr)
        return 2
    prompts = make_prompts(
        args.dataset, args.num_prompts, args.seed, args.random_input_len, args.random_output_len,
        args.random_range_ratio, args.max_output_len,
    )
    baseline = None
    if args.baseline_num_prompts > 0:
        baseline = make_prompts(
            args.dataset, args.baseline_num_prompts, args.seed + 7, args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.max_output_len,
        )
    results, duration, extras = asyncio.run(benchmark(args, prompts, baseline))
    summary = summarize(results, duration)
    add_extras(summary, extras)
    summary.update({"dataset": args.dataset, "request_rate": args.request_rate, "burstiness": args.burstiness,
                    "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts})
    print(format_summary(summary))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quire bench serve", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    return run(parser.parse_args(argv))


__all__ = ["BenchPrompt", "RequestResult", "add_cli_args", "make_prompts", "run", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
