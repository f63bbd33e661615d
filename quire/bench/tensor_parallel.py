"""Tensor parallelism on this machine: throughput at 1 vs k ranks, and what crosses between ranks per step.

    python -m quire.bench.tensor_parallel [--configs 1:2,1:1,2:1] [--num-requests 16] [--max-output 64] [--json]

``--configs`` lists ``ranks:threads per rank`` (threads 0: Quire's default, cores / ranks).

The same greedy request mix (``quire.bench.workload``, EOS ignored) runs once per size, each on a
fresh engine after a short warm-up; single-stream decode ms/step is timed on one request. The
communication figures are the driver's counters (``TPGroup.stats``): the step broadcast (header +
payload), the all-reduces (embedding and two per layer) and the logits gathered from the other
ranks, each divided by the number of steps. Ranks on one host share its cores (``cores / ranks``
threads each), so on a small machine more ranks only add communication; the machine's load is
printed with the figures because other processes distort them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from quire import LLM, SamplingParams
from quire.bench.workload import make_workload


def _busiest_processes(lines: int = 5) -> str:
    try:
        out = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "(ps unavailable)"
    return "\n".join(line[:140] for line in out.splitlines()[: lines + 1])


def run_size(size: int, threads: int, num_requests: int, max_output: int, dtype: str) -> dict:
    llm = LLM(dtype=dtype, tensor_parallel_size=size, num_threads=threads or None)
    try:
        tokenizer = llm.get_tokenizer()
        requests = make_workload(tokenizer, num_requests, output_len_range=(max_output // 2, max_output))
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        engine = llm.engine
        before = (engine.comm_stats(), llm.stats()["num_steps"])
        load = os.getloadavg()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        steps = llm.stats()["num_steps"] - before[1]
        comm = {k: (v - before[0][k]) for k, v in engine.comm_stats().items()}
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        # Single stream: decode steps of one request, prefill excluded.
        engine.add_request("single", prompts[0], SamplingParams(temperature=0, max_tokens=33, ignore_eos=True))
        engine.step()
        after_prefill = engine.comm_stats()
        t = time.perf_counter()
        decode_steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            decode_steps += 1
        decode_ms = (time.perf_counter() - t) / decode_steps * 1e3
        single = engine.comm_stats()
        return {
            "tensor_parallel_size": size,
            "threads_per_rank": threads or max(1, (os.cpu_count() or 1) // size),
            "wall_s": round(wall, 2),
            "output_tok_s": round(generated / wall, 1),
            "steps": steps,
            "single_stream_decode_ms": round(decode_ms, 1),
            "per_step_bytes": {
                "broadcast": round(comm["broadcast_bytes"] / steps),
                "all_reduce": round(comm["all_reduce_bytes"] / steps),
                "gather_logits": round(comm["gather_bytes"] / steps),
                "collectives": round((comm["num_all_reduces"] + comm["num_gathers"]) / steps, 1),
            },
            "single_decode_step_bytes": {
                k: round((single[k] - after_prefill[k]) / decode_steps)
                for k in ("broadcast_bytes", "all_reduce_bytes", "gather_bytes")
            },
            "load_avg_1m_before": round(load[0], 2),
        }
    finally:
        llm.engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1:2,1:1,2:1", help="ranks:threads per rank, comma-separated")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"cores: {os.cpu_count()}; busiest processes before the run:\n{_busiest_processes()}", flush=True)
    results = []
    for config in args.configs.split(","):
        size, _, threads = config.partition(":")
        result = run_size(int(size), int(threads or 0), args.num_requests, args.max_output, args.dtype)
        results.append(result)
        print(json.dumps(result) if args.json else _line(result), flush=True)
    print(f"busiest processes after the run:\n{_busiest_processes()}")
    return 0


def _line(r: dict) -> str:
    b, s = r["per_step_bytes"], r["single_decode_step_bytes"]
    return (
        f"tp={r['tensor_parallel_size']} x {r['threads_per_rank']} threads: {r['output_tok_s']} output tok/s "
        f"({r['wall_s']} s, {r['steps']} steps), "
        f"single-stream decode {r['single_stream_decode_ms']} ms/step; per step: broadcast {b['broadcast']} B, "
        f"all-reduce {b['all_reduce']} B, logits gathered {b['gather_logits']} B, {b['collectives']} collectives; "
        f"one-token decode step: broadcast {s['broadcast_bytes']} B, all-reduce {s['all_reduce_bytes']} B, "
        f"gather {s['gather_bytes']} B (load avg {r['load_avg_1m_before']})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
