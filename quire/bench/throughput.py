"""Offline throughput and single-stream latency: Quire against transformers on the same requests.

    quire bench throughput [--quick] [--dtypes float32,bfloat16] [--skip-hf] [--model PATH]
    (or python -m quire.bench.throughput ... [--json PATH])
    quire bench throughput --speculative JSON   (instead: speculative decoding A/B, quire.bench.spec_decode)

What is measured, and why this way:

* The request mix is ``quire.bench.workload`` (64 requests, prompts 16..256 tokens, outputs
  32..256 tokens, fixed seed), greedy with EOS ignored, so both engines produce exactly the
  requested tokens and the work is identical.
* Quire gets all requests in one ``LLM.generate`` call: continuous batching is the feature
  under test. transformers runs the requests in workload order in static, left-padded
  batches of ``--hf-batch-size``, each generating as many tokens as the longest request of
  the batch (min_new_tokens = max_new_tokens, so no row stops early). That is how a
  ``model.generate`` user batches; the tokens a row produces past its requested length are
  wasted work and are not counted.
* "useful output tok/s" = requested output tokens / wall time; "total tok/s" adds the real
  (unpadded) prompt tokens.
* Single-stream decode ms/token = (time(N tokens) - time(1 token)) / (N - 1) for one
  32-token prompt, which cancels prefill and per-call overhead and leaves the decode step.
  Each time is the median of ``--single-repeats`` runs.
* Every engine gets a short warm-up first (first-call allocations, kernel JIT/caches), and
  is built fresh per dtype so one run's caches do not flatter the next.
* ``--rounds N`` runs the whole plan N times, in reverse order every other round. Each ratio
  is taken within a round (runs minutes apart) and the median over rounds is reported: on a
  shared machine the speed of the same code drifts by tens of percent over an hour, and a
  slow phase that hits one engine only would decide a single-round ratio.

The comparisons printed: Quire float32 against transformers float32, each engine's best dtype
against the other's, and single-stream decode per dtype. Small CPU machines are often shared,
and with ``--threads`` equal to the core count a busy neighbour distorts every figure, so the
environment is printed with the numbers, each timed section first waits (``--wait-idle``) for the
CPUs to be free, and the CPU time other processes took during it is reported next to the result.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quire.bench.machine import gemm_peak_gflops, read_bandwidth_gbs
from quire.bench.workload import (
    BenchRequest,
    WorkloadSummary,
    make_workload,
    single_stream_prompt,
    summarize,
)
from quire.config import CPU_DTYPES, SpeculativeConfig

BATCHED_DECODE_SEQS = 64
BATCHED_DECODE_TOKENS = 33
QUICK_NUM_REQUESTS = 16
WARMUP_REQUESTS = 4
WARMUP_TOKENS = 8

_TORCH_DTYPES = {name: getattr(torch, name) for name in CPU_DTYPES if name != "auto"}


def say(*parts: object) -> None:
    """Print and flush at once: the run takes minutes and is usually piped through ``tee``."""
    print(*parts, flush=True)


# -- a shared machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """Counters to tell, after a timed section, how much CPU *other* processes took meanwhile.

    With ``--threads`` equal to the core count, every parallel op ends in a barrier: one
    thread descheduled by a compile next door stalls the op for a scheduler time slice.
    Ops of a 135M model last ~0.1-1 ms, so a single busy neighbour can slow the run 10x or
    more. The numbers are only worth reading alongside this measurement.
    """

    wall: float
    system_busy_s: float | None  # all CPUs, from /proc/stat
    own_cpu_s: float  # this process, all threads
    pressure_some_us: int | None  # /proc/pressure/cpu: time some task waited for a CPU


def _system_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # guest time is already inside user time
    return busy / os.sysconf("SC_CLK_TCK")


def _cpu_pressure_us() -> int | None:
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return int(some[-1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_snapshot() -> CpuSnapshot:
    return CpuSnapshot(time.perf_counter(), _system_busy_seconds(), time.process_time(), _cpu_pressure_us())


def contention(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float | None]:
    """Other processes' CPU use (in CPUs) and CPU pressure (% of wall time) between two snapshots."""
    wall = max(after.wall - before.wall, 1e-9)
    others = None
    if before.system_busy_s is not None and after.system_busy_s is not None:
        busy = after.system_busy_s - before.system_busy_s
        others = max(0.0, (busy - (after.own_cpu_s - before.own_cpu_s)) / wall)
    pressure = None
    if before.pressure_some_us is not None and after.pressure_some_us is not None:
        pressure = (after.pressure_some_us - before.pressure_some_us) / 1e6 / wall * 100
    return {"other_cpus": others, "cpu_pressure_pct": pressure}


def wait_for_quiet(max_wait_s: float, busy_cpus: float = 0.25, window_s: float = 1.0) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``busy_cpus`` CPUs.

    Called between timed sections, when this process is idle, so everything busy is someone
    else. Returns the seconds waited; the caller says so, and times the section anyway.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = cpu_snapshot()
        time.sleep(window_s)
        others = contention(before, cpu_snapshot())["other_cpus"]
        if others is None or others < busy_cpus:
            break
    return time.perf_counter() - start


class Timer:
    """Times one section and records what else the machine was doing during it."""

    def __init__(self, label: str, max_wait_s: float) -> None:
        self.label, self.max_wait_s = label, max_wait_s
        self.seconds = 0.0
        self.load: dict[str, float | None] = {}

    def __enter__(self) -> Timer:
        waited = wait_for_quiet(self.max_wait_s) if self.max_wait_s > 0 else 0.0
        if waited >= self.max_wait_s > 0:
            say(f"  [{self.label}] machine still busy after waiting {waited:.0f}s; timing anyway")
        self._before = cpu_snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_snapshot()
        self.seconds = after.wall - self._before.wall
        self.load = contention(self._before, after)


# -- results ---------------------------------------------------------------------------------


@dataclass
class SingleStream:
    """One request, ``prompt_len`` tokens in; decode cost per token with prefill cancelled out."""

    prompt_len: int
    output_len: int
    one_token_s: list[float]  # every repeat, so the spread is visible in the JSON
    all_tokens_s: list[float]

    @property
    def ms_per_token(self) -> float:
        delta = statistics.median(self.all_tokens_s) - statistics.median(self.one_token_s)
        return delta / (self.output_len - 1) * 1e3


@dataclass
class RunResult:
    """One engine at one dtype. ``error`` is set (and the figures left empty) if the run failed."""

    engine: str
    dtype: str
    round: int = 0  # which repetition of the plan (--rounds)
    load_s: float | None = None
    wall_s: float | None = None
    prompt_tokens: int = 0
    useful_output_tokens: int = 0
    generated_tokens: int = 0  # including transformers' tokens past a request's length
    single: SingleStream | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Per timed section ("throughput", "single_stream"): other processes' CPU use meanwhile.
    contention: dict[str, dict[str, float | None]] = field(default_factory=dict)
    error: str | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # for the agreement check only

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s is not None

    @property
    def useful_tok_s(self) -> float | None:
        return self.useful_output_tokens / self.wall_s if self.ok else None

    @property
    def total_tok_s(self) -> float | None:
        return (self.prompt_tokens + self.useful_output_tokens) / self.wall_s if self.ok else None

    @property
    def ms_per_token(self) -> float | None:
        return self.single.ms_per_token if self.single is not None else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("outputs")
        data["useful_output_tok_s"] = self.useful_tok_s
        data["total_tok_s"] = self.total_tok_s
        data["single_stream_ms_per_token"] = self.ms_per_token
        return data


@dataclass(frozen=True)
class BenchConfig:
    """The resolved command line: what every runner needs, passed explicitly."""

    num_requests: int
    seed: int
    dtypes: tuple[str, ...]
    hf_dtypes: tuple[str, ...]
    skip_hf: bool
    hf_batch_size: int
    threads: int
    single_prompt_len: int
    single_output_len: int
    single_repeats: int
    quick: bool
    rounds: int
    wait_idle_s: float
    json_path: str | None
    model: str | None = None  # HF dir or .gguf; None: the embedded default model
    speculative: SpeculativeConfig | None = None  # run the speculative-decoding A/B instead


# -- shared measurement helpers ------------------------------------------------------------


def measure_single_stream(
    generate: Callable[[int], int], prompt_len: int, output_len: int, repeats: int
) -> SingleStream:
    """Time ``generate(1)`` and ``generate(output_len)`` alternately, ``repeats`` times each.

    ``generate(n)`` runs the fixed prompt for ``n`` new tokens and returns how many it got,
    which is checked so that an early stop cannot pass for a fast decode. Alternating the two
    spreads slow phases of a shared machine over both, so they cancel in the difference.
    """
    if output_len < 2:
        raise ValueError("single-stream output length must be >= 2")
    one, full = [], []
    for _ in range(repeats):
        for n, samples in ((1, one), (output_len, full)):
            start = time.perf_counter()
            produced = generate(n)
            samples.append(time.perf_counter() - start)
            if produced != n:
                raise RuntimeError(f"single stream asked for {n} tokens, got {produced}")
    return SingleStream(prompt_len=prompt_len, output_len=output_len, one_token_s=one, all_tokens_s=full)


def check_lengths(engine: str, requests: Sequence[BenchRequest], outputs: Sequence[Sequence[int]]) -> None:
    """Fail loudly if any request got a different number of tokens than it asked for."""
    bad = [(i, r.output_len, len(o)) for i, (r, o) in enumerate(zip(requests, outputs, strict=True))
           if len(o) != r.output_len]
    if bad:
        raise RuntimeError(f"{engine}: {len(bad)} requests got the wrong number of tokens, e.g. {bad[:3]}")


def _release() -> None:
    """Drop the previous engine's memory before the next one loads (models, KV caches)."""
    gc.collect()


# -- Quire ---------------------------------------------------------------------------------


def run_quire(
    dtype: str, requests: Sequence[BenchRequest], single_prompt: Sequence[int], cfg: BenchConfig
) -> RunResult:
    """All requests in one ``generate`` call (continuous batching), then the single stream."""
    from quire import LLM, SamplingParams

    result = RunResult(engine="quire", dtype=dtype)
    start = time.perf_counter()
    llm = LLM(cfg.model, dtype=dtype, seed=cfg.seed, num_threads=cfg.threads)
    result.load_s = time.perf_counter() - start

    prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    warmup = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate(prompts[:WARMUP_REQUESTS], warmup, use_tqdm=False)

    before = llm.stats()
    with Timer("quire throughput", cfg.wait_idle_s) as timer:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    result.wall_s = timer.seconds
    result.contention["throughput"] = timer.load
    after = llm.stats()

    result.outputs = [list(o.outputs[0].token_ids) for o in outputs]
    check_lengths("quire", requests, result.outputs)
    result.prompt_tokens = sum(r.prompt_len for r in requests)
    result.useful_output_tokens = result.generated_tokens = sum(r.output_len for r in requests)

    block_size = after["block_size"]
    # The engine's own figure for one block across all layers, K and V.
    per_block = llm.engine.kv_bytes_per_block
    all_resident = sum(math.ceil((r.prompt_len + r.output_len) / block_size) for r in requests)
    result.details = {
        "block_size": block_size,
        "num_kv_blocks": after["num_kv_blocks"],
        "kv_cache_allocated_mib": after["num_kv_blocks"] * per_block / 2**20,
        # A lifetime peak; the warm-up before it is far smaller, so this is the timed run's.
        "peak_used_kv_blocks": after["peak_used_kv_blocks"],
        "peak_kv_mib": after["peak_used_kv_blocks"] * per_block / 2**20,
        "kv_bytes_per_block": per_block,
        "blocks_if_all_requests_resident": all_resident,
        "num_steps": after["num_steps"] - before["num_steps"],
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "prompt_tokens_computed": after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"],
        "attention_kernel": llm.engine.model_info().attention_kernel,
    }

    def one_request(n: int) -> int:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": list(single_prompt)}], sp, use_tqdm=False)
        return len(out[0].outputs[0].token_ids)

    one_request(WARMUP_TOKENS)
    with Timer(f"{result.engine} single stream", cfg.wait_idle_s) as timer:
        result.single = measure_single_stream(
            one_request, len(single_prompt), cfg.single_output_len, cfg.single_repeats
        )
    result.contention["single_stream"] = timer.load

    # A decode step of BATCHED_DECODE_SEQS sequences, prefill cancelled out as in the single stream.
    batch_prompts = [{"prompt_token_ids": list(requests[i % len(requests)].prompt_token_ids[:32])}
                     for i in range(BATCHED_DECODE_SEQS)]

    def batch_of(n: int) -> int:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        outs = llm.generate(batch_prompts, sp, use_tqdm=False)
        return min(len(o.outputs[0].token_ids) for o in outs)

    with Timer(f"{result.engine} batched decode", cfg.wait_idle_s) as timer:
        batched = measure_single_stream(batch_of, 32, BATCHED_DECODE_TOKENS, 2)
    result.contention["batched_decode"] = timer.load
    weight_bytes, _ = llm.engine.linear_traffic(1)
    _, step_flops = llm.engine.linear_traffic(BATCHED_DECODE_SEQS)
    result.details["weight_bytes_per_token"] = weight_bytes
    result.details["batched_decode_step_ms"] = batched.ms_per_token
    result.details["batched_decode_gflops"] = step_flops / (batched.ms_per_token * 1e-3) / 1e9
    return result


# -- transformers ----------------------------------------------------------------------------


def load_hf_model(dtype: str, model_path: str | None = None):
    """transformers' Llama on the very GGUF file (or HF directory) Quire loads (dequantized the same way)."""
    from transformers import AutoModelForCausalLM

    path = _model_file(model_path)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=_TORCH_DTYPES[dtype]).eval()
    # The GGUF converter draws its own tqdm bar on stderr, past transformers' logging switches;
    # keep it out of the report unless the load fails.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=_TORCH_DTYPES[dtype]
            )
    except Exception:
        sys.stderr.write(captured.getvalue())
        raise
    return model.eval()


def _model_file(model_path: str | None) -> Path:
    from quire.models.loader import resolve_model_path

    return Path(resolve_model_path(model_path))


def _pad_token_id(gen_config) -> int:
    """The model's pad id, else its (first) EOS id, else 2 (SmolLM2's EOS): padding is masked anyway."""
    for candidate in (gen_config.pad_token_id, gen_config.eos_token_id):
        if isinstance(candidate, list | tuple):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 2


def hf_generate(model, batch: Sequence[Sequence[int]], new_tokens: int, pad_id: int) -> torch.Tensor:
    """Greedy ``model.generate`` of a left-padded batch; exactly ``new_tokens`` tokens per row.

    Returns only the generated ids ``[len(batch), new_tokens]``.
    """
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # suppresses EOS, so no row (and no batch) ends early
            pad_token_id=pad_id,
        )
    generated = out[:, width:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"transformers generated {generated.shape[1]} tokens, expected {new_tokens}")
    return generated


def run_hf(
    dtype: str, requests: Sequence[BenchRequest], single_prompt: Sequence[int], cfg: BenchConfig
) -> RunResult:
    """Static batches in workload order, each as long as its longest request; then the single stream."""
    result = RunResult(engine="transformers", dtype=dtype)
    start = time.perf_counter()
    model = load_hf_model(dtype, cfg.model)
    result.load_s = time.perf_counter() - start
    pad_id = _pad_token_id(model.generation_config)

    hf_generate(model, [r.prompt_token_ids for r in requests[:2]], WARMUP_TOKENS, pad_id)

    outputs: list[list[int]] = []
    generated = 0
    batch_times = []
    with Timer("transformers throughput", cfg.wait_idle_s) as timer:
        for begin in range(0, len(requests), cfg.hf_batch_size):
            batch = requests[begin : begin + cfg.hf_batch_size]
            new_tokens = max(r.output_len for r in batch)
            batch_start = time.perf_counter()
            tokens = hf_generate(model, [r.prompt_token_ids for r in batch], new_tokens, pad_id)
            batch_times.append(time.perf_counter() - batch_start)
            outputs += [tokens[row, : r.output_len].tolist() for row, r in enumerate(batch)]
            generated += len(batch) * new_tokens
    result.wall_s = timer.seconds
    result.contention["throughput"] = timer.load

    result.outputs = outputs
    check_lengths("transformers", requests, outputs)
    result.prompt_tokens = sum(r.prompt_len for r in requests)
    result.useful_output_tokens = sum(r.output_len for r in requests)
    result.generated_tokens = generated
    result.details = {
        "batch_size": cfg.hf_batch_size,
        "batch_wall_s": batch_times,
        "wasted_output_tokens": generated - result.useful_output_tokens,
        "pad_token_id": pad_id,
    }

    def one_request(n: int) -> int:
        return hf_generate(model, [single_prompt], n, pad_id).shape[1]

    one_request(WARMUP_TOKENS)
    with Timer(f"{result.engine} single stream", cfg.wait_idle_s) as timer:
        result.single = measure_single_stream(
            one_request, len(single_prompt), cfg.single_output_len, cfg.single_repeats
        )
    result.contention["single_stream"] = timer.load

    return result


# -- environment and report ------------------------------------------------------------------


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    import transformers

    import quire
    from quire.kernels import cpu_kernel

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "quire": quire.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_kernel.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "quire_kernels": cpu_kernel.isa_level() if cpu_kernel.is_available() else "none (PyTorch paths)",
        "isa_levels": " ".join(cpu_kernel.isa_levels()),
        "load_average_start": _load_average(),
    }


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash of the same width when there is no value."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(value, spec)


BUSY_OTHERS_WARNING = 0.2  # CPUs used by other processes during a timed section


def _others(r: RunResult, section: str) -> float | None:
    return r.contention.get(section, {}).get("other_cpus")


def print_table(results: Sequence[RunResult]) -> None:
    header = (
        f"{'engine':<13} {'dtype':<9} {'round':>5} {'load s':>7} {'wall s':>8} {'useful out tok/s':>16} "
        f"{'total tok/s':>11} {'ms/token 1-stream':>17} {'peak KV blocks':>14} {'peak KV MiB':>11} "
        f"{'others CPUs':>11}"
    )
    say(header)
    say("-" * len(header))
    for r in results:
        if not r.ok:
            reason = r.error.splitlines()[-1] if r.error else "no result"
            say(f"{r.engine:<13} {r.dtype:<9} {r.round + 1:>5} FAILED: {reason}")
            continue
        say(
            f"{r.engine:<13} {r.dtype:<9} {r.round + 1:>5} {_fmt(r.load_s, '7.1f')} {_fmt(r.wall_s, '8.2f')} "
            f"{_fmt(r.useful_tok_s, '16.1f')} {_fmt(r.total_tok_s, '11.1f')} {_fmt(r.ms_per_token, '17.2f')} "
            f"{r.details.get('peak_used_kv_blocks', '-'):>14} {_fmt(r.details.get('peak_kv_mib'), '11.1f')} "
            f"{_fmt(_others(r, 'throughput'), '5.2f')}/{_fmt(_others(r, 'single_stream'), '.2f')}"
        )
    say("(others CPUs: CPUs used by other processes during the throughput / single-stream timing)")
    busy = [
        f"{r.engine} {r.dtype} {section}"
        for r in results
        for section in ("throughput", "single_stream")
        if (_others(r, section) or 0.0) > BUSY_OTHERS_WARNING
    ]
    if busy:
        say(f"WARNING: other processes used > {BUSY_OTHERS_WARNING} CPUs during: {', '.join(busy)}; "
            "those figures understate the engine (rerun on a quiet machine)")


def _best(results: Sequence[RunResult], engine: str) -> RunResult | None:
    candidates = [r for r in results if r.engine == engine and r.ok]
    return max(candidates, key=lambda r: r.useful_tok_s) if candidates else None


def _find(results: Sequence[RunResult], engine: str, dtype: str) -> RunResult | None:
    return next((r for r in results if r.engine == engine and r.dtype == dtype and r.ok), None)


def compare(results: Sequence[RunResult]) -> dict[str, Any]:
    """The three comparisons, computed from whatever runs succeeded (absent if not measurable)."""
    figures: dict[str, Any] = {}
    quire_fp32, hf_fp32 = _find(results, "quire", "float32"), _find(results, "transformers", "float32")
    if quire_fp32 and hf_fp32:
        ratio = quire_fp32.useful_tok_s / hf_fp32.useful_tok_s
        figures["fp32_speedup"] = {"value": ratio}
    quire_best, hf_best = _best(results, "quire"), _best(results, "transformers")
    if quire_best and hf_best:
        ratio = quire_best.useful_tok_s / hf_best.useful_tok_s
        figures["best_speedup"] = {
            "value": ratio,
            "quire_dtype": quire_best.dtype,
            "transformers_dtype": hf_best.dtype,
        }
    singles = {r.dtype: r.ms_per_token for r in results if r.engine == "quire" and r.ms_per_token is not None}
    if singles:
        best_dtype = min(singles, key=singles.get)
        figures["single_stream"] = {
            "ms_per_token": singles,
            "best_dtype": best_dtype,
        }
    hf_singles = {r.dtype: r.ms_per_token for r in results if r.engine == "transformers" and r.ms_per_token is not None}
    if singles and hf_singles:
        figures["single_stream"]["transformers_ms_per_token"] = hf_singles
    return figures


def combine_rounds(per_round: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparisons over several rounds: the median of the within-round ratios and latencies.

    With one round this is that round's figures. ``per_round`` keeps every round's value.
    """
    if len(per_round) == 1:
        return dict(per_round[0])
    figures: dict[str, Any] = {}
    for key in ("fp32_speedup", "best_speedup"):
        rounds = [f[key] for f in per_round if key in f]
        if not rounds:
            continue
        value = statistics.median(r["value"] for r in rounds)
        figures[key] = {"value": value, "per_round": [r["value"] for r in rounds]}
        if key == "best_speedup":
            figures[key]["quire_dtype"] = statistics.mode(r["quire_dtype"] for r in rounds)
            figures[key]["transformers_dtype"] = statistics.mode(r["transformers_dtype"] for r in rounds)
    singles = [f["single_stream"] for f in per_round if "single_stream" in f]
    if singles:
        def medians(field: str) -> dict[str, float]:
            dtypes = {d for s in singles for d in s.get(field, {})}
            return {d: statistics.median(s[field][d] for s in singles if d in s.get(field, {})) for d in sorted(dtypes)}

        ms = medians("ms_per_token")
        best_dtype = min(ms, key=ms.get)
        figures["single_stream"] = {
            "ms_per_token": ms,
            "best_dtype": best_dtype,
            "per_round": [s["ms_per_token"] for s in singles],
        }
        hf = medians("transformers_ms_per_token")
        if hf:
            figures["single_stream"]["transformers_ms_per_token"] = hf
    return figures


def print_comparison(figures: dict[str, Any]) -> None:
    def rounds(figure: dict[str, Any]) -> str:
        values = figure.get("per_round")
        return f" (median of rounds: {', '.join(f'{v:.2f}' for v in values)})" if values else ""

    fp32 = figures.get("fp32_speedup")
    if fp32:
        say(f"Quire float32 / transformers float32 useful tok/s: {fp32['value']:.2f}x{rounds(fp32)}")
    else:
        say("Quire float32 / transformers float32: n/a (a float32 run is missing or failed)")
    best = figures.get("best_speedup")
    if best:
        say(f"Quire best ({best['quire_dtype']}) / transformers best ({best['transformers_dtype']}) useful tok/s: "
            f"{best['value']:.2f}x{rounds(best)}")
    else:
        say("Quire best / transformers best: n/a")
    single = figures.get("single_stream")
    if single:
        per_dtype = ", ".join(f"{d} {ms:.2f}" for d, ms in single["ms_per_token"].items())
        say(f"Quire single-stream decode ms/token: {per_dtype}; best {single['best_dtype']}")
    else:
        say("Quire single-stream decode: n/a")


def machine_figures(results: Sequence[RunResult], cfg: BenchConfig) -> dict[str, Any]:
    """Quire's decode against what the machine allows, measured now: the weight-read bound of one
    step and the GEMM peak in the dtype used."""
    bandwidth = read_bandwidth_gbs()
    figures: dict[str, Any] = {"read_bandwidth_gbs": bandwidth, "dtypes": {}}
    for dtype in cfg.dtypes:
        runs = [r for r in results if r.engine == "quire" and r.dtype == dtype and r.ok]
        if not runs:
            continue
        peak = gemm_peak_gflops(_TORCH_DTYPES[dtype])
        weight_bytes = runs[0].details["weight_bytes_per_token"]
        figures["dtypes"][dtype] = {
            "gemm_peak_gflops": peak,
            "weight_mb_per_token": weight_bytes / 1e6,
            "weight_read_bound_ms": weight_bytes / (bandwidth * 1e9) * 1e3,
            "single_ms_per_token": statistics.median(r.ms_per_token for r in runs),
            "batched_decode_gflops": statistics.median(r.details["batched_decode_gflops"] for r in runs),
        }
    return figures


def print_machine(figures: dict[str, Any], env: dict[str, Any]) -> None:
    say(f"machine: {env['cpu_model']}, kernels {env['quire_kernels']} (levels: {env['isa_levels']}), "
        f"{env['usable_cpus']} CPUs, {env['torch_threads']} threads; read bandwidth "
        f"{figures['read_bandwidth_gbs']:.1f} GB/s")
    for dtype, f in figures["dtypes"].items():
        say(f"  {dtype}: single-stream decode {f['single_ms_per_token']:.2f} ms/token, weight-read bound "
            f"{f['weight_read_bound_ms']:.2f} ms ({f['weight_mb_per_token']:.1f} MB of weights a token / "
            f"bandwidth): {f['single_ms_per_token'] / f['weight_read_bound_ms']:.2f}x the bound")
        say(f"  {dtype}: decode step of {BATCHED_DECODE_SEQS} sequences {f['batched_decode_gflops']:.1f} GFLOP/s "
            f"in the linears = {100 * f['batched_decode_gflops'] / f['gemm_peak_gflops']:.0f}% of the "
            f"{GEMM_LABEL} GEMM peak {f['gemm_peak_gflops']:.1f} GFLOP/s")


GEMM_LABEL = "1024-cube (best of torch.mm, oneDNN, in the dtype or float32)"


def agreement(results: Sequence[RunResult]) -> dict[str, Any] | None:
    """How far Quire's and transformers' greedy float32 outputs agree (a sanity check, not a gate).

    Greedy decoding of the same weights should match token for token until a near tie,
    where float rounding (batched vs padded matmuls) may pick the other token; after that
    the texts legitimately differ. A low common-prefix length means the two engines are
    not computing the same model, and the throughput comparison would be meaningless.
    """
    quire_fp32, hf_fp32 = _find(results, "quire", "float32"), _find(results, "transformers", "float32")
    if not (quire_fp32 and hf_fp32):
        return None
    prefixes, identical = [], 0
    for mine, theirs in zip(quire_fp32.outputs, hf_fp32.outputs, strict=True):
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), len(mine))
        prefixes.append(common)
        identical += common == len(mine)
    return {
        "requests": len(prefixes),
        "identical": identical,
        "mean_common_prefix": statistics.mean(prefixes),
        "mean_output_len": statistics.mean(len(o) for o in quire_fp32.outputs),
        "min_common_prefix": min(prefixes),
    }


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m quire.bench.throughput",
        description="Offline throughput and single-stream latency of Quire against transformers.",
    )
    add_cli_args(parser)
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write every figure to PATH as JSON")
    return config_from_args(parser.parse_args(argv), parser)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The options (shared by ``python -m quire.bench.throughput`` and ``quire bench throughput``)."""
    parser.add_argument("--num-requests", type=int, default=None,
                        help=f"requests in the mix (default 64; {QUICK_NUM_REQUESTS} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--dtypes", default=None,
                        help="Quire dtypes, comma-separated (default float32,bfloat16; float32 with --quick)")
    parser.add_argument("--hf-dtypes", default=None,
                        help="transformers dtypes (default float32,bfloat16; float32 with --quick)")
    parser.add_argument("--skip-hf", action="store_true", help="do not run the transformers baseline")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="transformers static batch size (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both engines (default 2)")
    parser.add_argument("--single-prompt-len", type=int, default=32, help="single-stream prompt tokens (default 32)")
    parser.add_argument("--single-output-len", type=int, default=128,
                        help="single-stream generated tokens (default 128)")
    parser.add_argument("--single-repeats", type=int, default=None,
                        help="timings per single-stream length, median taken (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_NUM_REQUESTS} requests, float32 only, one single-stream repeat")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine/dtype this many times, alternating the order; ratios are the "
                        "median of the within-round ratios (default 1)")
    parser.add_argument("--wait-idle", type=float, default=60.0, metavar="SECONDS",
                        help="before each timed section, wait up to this long for other processes to leave the "
                        "CPUs (default 60; 0: never wait)")
    parser.add_argument("--model", default=None, help="HF model directory or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--speculative", type=SpeculativeConfig.parse, default=None, metavar="JSON",
                        help="instead: single-stream ms/token with and without this speculative_config (A/B in one "
                        "process, on repetitive and open-ended tasks; quire.bench.spec_decode), first of --dtypes")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    def dtypes(value: str | None, flag: str) -> tuple[str, ...]:
        names = tuple(d.strip() for d in (value or ("float32" if args.quick else "float32,bfloat16")).split(","))
        unknown = [d for d in names if d not in _TORCH_DTYPES]
        if unknown or not names:
            parser.error(f"{flag}: unknown dtypes {unknown}; choose from {sorted(_TORCH_DTYPES)}")
        return names

    cfg = BenchConfig(
        num_requests=args.num_requests if args.num_requests is not None else (QUICK_NUM_REQUESTS if args.quick else 64),
        seed=args.seed,
        dtypes=dtypes(args.dtypes, "--dtypes"),
        hf_dtypes=dtypes(args.hf_dtypes, "--hf-dtypes"),
        skip_hf=args.skip_hf,
        hf_batch_size=args.hf_batch_size,
        threads=args.threads,
        single_prompt_len=args.single_prompt_len,
        single_output_len=args.single_output_len,
        single_repeats=args.single_repeats or (1 if args.quick else 3),
        quick=args.quick,
        rounds=args.rounds,
        wait_idle_s=max(0.0, args.wait_idle),
        json_path=getattr(args, "json_path", None),
        model=args.model,
        speculative=args.speculative,
    )
    for name in ("num_requests", "hf_batch_size", "threads", "single_prompt_len", "single_repeats", "rounds"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.single_output_len < 2:
        parser.error("--single-output-len must be >= 2 (the 1-token run is subtracted)")
    return cfg


def _run_guarded(label: str, run: Callable[[], RunResult], engine: str, dtype: str) -> RunResult:
    """Run one engine/dtype; a failure is reported and recorded, and the other runs still happen."""
    say(f"\n== {label} ==")
    start = time.perf_counter()
    try:
        result = run()
    except Exception:  # a broken dtype must not hide the others' numbers
        trace = traceback.format_exc()
        say(trace)
        result = RunResult(engine=engine, dtype=dtype, error=trace.strip())
    finally:
        _release()
    if result.ok:
        say(
            f"{label}: load {result.load_s:.1f}s, wall {result.wall_s:.2f}s, "
            f"{result.useful_tok_s:.1f} useful out tok/s, {result.total_tok_s:.1f} total tok/s, "
            f"single stream {_fmt(result.ms_per_token, '.2f')} ms/token "
            f"(run took {time.perf_counter() - start:.0f}s)"
        )
        if result.details:
            shown = {k: v for k, v in result.details.items() if k != "batch_wall_s"}
            say(f"  details: {shown}")
        loads = {
            section: {k: None if v is None else round(v, 2) for k, v in load.items()}
            for section, load in result.contention.items()
        }
        say(f"  other load during timing: {loads}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


def run(cfg: BenchConfig) -> int:
    """Every run of ``cfg``, printed (and written to ``cfg.json_path`` if set); non-zero if one failed."""
    # Offline machine: never let transformers try the Hub; tokenizers must not fork-warn.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(cfg.threads)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter would bury the table
    hf_logging.disable_progress_bar()  # GGUF dequantization bars, one per model load

    env = environment()
    say("== environment ==")
    for key, value in env.items():
        say(f"  {key}: {value}")
    if cfg.speculative is not None:
        return _run_speculative(cfg, env)

    model_path = _model_file(cfg.model)
    say(f"  model: {model_path.name}")
    if model_path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    requests = make_workload(tokenizer, num_requests=cfg.num_requests, seed=cfg.seed)
    single_prompt = single_stream_prompt(tokenizer, cfg.single_prompt_len)
    summary: WorkloadSummary = summarize(requests)
    say(
        f"== workload == {summary.num_requests} requests (seed {cfg.seed}), prompts {summary.min_prompt_len}.."
        f"{summary.max_prompt_len} ({summary.prompt_tokens} tokens), outputs {summary.min_output_len}.."
        f"{summary.max_output_len} ({summary.output_tokens} tokens); single stream {len(single_prompt)} prompt "
        f"+ {cfg.single_output_len} tokens x {cfg.single_repeats}"
    )

    plan: list[tuple[str, str, Callable[[], RunResult]]] = [
        ("quire", dtype, lambda d=dtype: run_quire(d, requests, single_prompt, cfg)) for dtype in cfg.dtypes
    ]
    if not cfg.skip_hf:
        plan += [
            ("transformers", dtype, lambda d=dtype: run_hf(d, requests, single_prompt, cfg))
            for dtype in cfg.hf_dtypes
        ]
    rounds: list[list[RunResult]] = []
    interrupted = False
    try:
        for k in range(cfg.rounds):
            rounds.append([])
            # Reversed every other round, so that neither engine always runs right after loading.
            for engine, dtype, run in plan if k % 2 == 0 else plan[::-1]:
                label = f"{engine} {dtype}" + (f" (round {k + 1}/{cfg.rounds})" if cfg.rounds > 1 else "")
                result = _run_guarded(label, run, engine, dtype)
                result.round = k
                rounds[-1].append(result)
    except KeyboardInterrupt:  # still report what was measured
        interrupted = True
        say("\ninterrupted: reporting the runs that finished")
    results = [r for round_results in rounds for r in round_results]

    env["load_average_end"] = _load_average()
    say("\n== results ==")
    say(f"load average at start {env['load_average_start']}, at end {env['load_average_end']} "
        f"(on {env['usable_cpus']} CPUs; higher means the numbers were shared with other work)")
    print_table(results)
    say("")
    figures = combine_rounds([compare(round_results) for round_results in rounds] or [{}])
    print_comparison(figures)
    figures["machine"] = machine_figures(results, cfg)
    print_machine(figures["machine"], env)
    agree = agreement(results)
    if agree:
        say(f"greedy float32 agreement with transformers: {agree['identical']}/{agree['requests']} requests "
            f"identical; common prefix mean {agree['mean_common_prefix']:.1f} of {agree['mean_output_len']:.1f} "
            f"tokens, min {agree['min_common_prefix']}")

    if cfg.json_path:
        report = {
            "environment": env,
            "config": asdict(cfg),
            "workload": {
                **asdict(summary),
                "prompt_lens": [r.prompt_len for r in requests],
                "output_lens": [r.output_len for r in requests],
            },
            "results": [r.to_json() for r in results],
            "comparison": figures,
            "agreement": agree,
            "interrupted": interrupted,
        }
        Path(cfg.json_path).write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {cfg.json_path}")
    failed = interrupted or any(r.error is not None for r in results)
    return 1 if failed else 0


def _run_speculative(cfg: BenchConfig, env: dict[str, Any]) -> int:
    from quire.bench import spec_decode

    say(f"== speculative decoding A/B == {cfg.speculative}, {cfg.dtypes[0]}, up to {cfg.single_output_len} tokens, "
        f"{cfg.single_repeats} repeats")
    report = spec_decode.run(
        cfg.speculative, cfg.model, cfg.dtypes[0], cfg.threads, cfg.single_output_len, cfg.single_repeats, say
    )
    env["load_average_end"] = _load_average()
    say(f"load average at start {env['load_average_start']}, at end {env['load_average_end']} "
        f"(on {env['usable_cpus']} CPUs; higher means the numbers were shared with other work)")
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps({"environment": env, "spec_decode": report}, indent=2) + "\n")
        say(f"wrote {cfg.json_path}")
    return 0 if all(t["identical"] for t in report["tasks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
