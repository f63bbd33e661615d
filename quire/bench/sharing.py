"""KV block sharing: memory saved by parallel sampling and beam search, prefill saved by the prefix cache.

    python -m quire.bench.sharing [--num-requests 200] [--beam-requests 6] [--prefix-requests 32] [--json]

1. Parallel sampling (n = 2, 4, 6), the paper's Fig. 15 metric: KV blocks saved by sharing ÷ blocks
   needed without sharing, summed over every decoding step (a time average of memory). Exact and
   cheap: it drives the engine's own ``KVCacheManager`` (prompt allocated once, ``fork`` into n
   sequences, copy-on-write of the partial prompt block, one token per step each) over requests
   drawn from the Alpaca-like and ShareGPT-like length distributions (``quire.bench.serve``); each
   sequence's output length is drawn independently, as sampled sequences end at different times.
2. Beam search (width 2, 4, 6), same metric, measured on the real engine and model (beams fork and
   drop as the search goes, so it cannot be simulated): per step, blocks in use ÷ the sum of the
   live beams' block-table lengths. Prompts come from the same distributions; ``max_tokens`` is the
   drawn output length (ShareGPT-like capped by ``--beam-max-tokens`` to stay short), EOS ignored.
3. Prefix cache: ``--prefix-requests`` requests share an 80- and a 341-token prefix (the paper's
   few-shot prefixes) followed by an Alpaca-like instruction; reported: prompt tokens computed with
   the cache on and off, and the end-to-end throughput of each (a short timing: re-run it on a
   quiet machine for figures).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from quire.bench.serve import DATASETS, make_prompts
from quire.core.kv_cache_manager import KVCacheManager, cdiv

BLOCK_SIZE = 16
PAPER_ALPACA = {"parallel": {2: 6.1, 4: 8.5, 6: 9.8}, "beam": {2: 37.6, 4: 53.1, 6: 55.2}}
PAPER_PREFIX_SPEEDUP = {80: 1.67, 341: 3.58}


def _lengths(rng: random.Random, mean: float, sigma: float, low: int, cap: int) -> int:
    value = rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
    return max(low, min(cap, round(value)))


def parallel_sampling_savings(dataset: str, n: int, num_requests: int, seed: int = 0) -> float:
    """Fraction of KV blocks saved by sharing the prompt among n samples, over all decoding steps."""
    p_mean, p_sigma, o_mean, o_sigma, cap = DATASETS[dataset]
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt = _lengths(rng, p_mean, p_sigma, 4, 2048)
        outputs = [_lengths(rng, o_mean, o_sigma, 1, cap) for _ in range(n)]
        requests.append((prompt, outputs))
    capacity = sum(n * cdiv(p + max(o), BLOCK_SIZE) for p, o in requests)
    kv = KVCacheManager(capacity, BLOCK_SIZE)
    live: dict[int, tuple[int, int]] = {}  # seq id -> (current length, final length)
    next_id = 0
    for prompt, outputs in requests:  # prefill once, then fork: the prompt's blocks are shared
        parent = next_id
        kv.allocate_slots(parent, 0, prompt)
        for i, out in enumerate(outputs):
            seq = parent + i
            if i:
                kv.fork(parent, seq)
            live[seq] = (prompt, prompt + out)
        next_id += n
    used = unshared = 0
    while live:
        for seq, (length, final) in list(live.items()):
            kv.allocate_slots(seq, length, 1)  # copy-on-write when the block is still shared
            live[seq] = (length + 1, final)
            if length + 1 >= final:
                del live[seq]
        used += kv.pool.num_used
        unshared += sum(len(t) for t in kv.block_tables.values())
        for seq in [s for s in kv.block_tables if s not in live]:
            kv.free(seq)
    return 1 - used / unshared


def beam_search_savings(llm, dataset: str, width: int, num_requests: int, max_tokens_cap: int, seed: int = 0):
    """Fraction of KV blocks saved by sharing among beams on the real engine, summed over steps."""
    from quire import BeamSearchParams

    engine = llm.engine
    prompts = make_prompts(dataset, num_requests, seed=seed, max_output_len=max_tokens_cap)
    for i, p in enumerate(prompts):
        engine.add_request(
            f"beam-{i}", p.prompt, BeamSearchParams(beam_width=width, max_tokens=p.output_len, ignore_eos=True)
        )
    used = unshared = 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.stats()
        used += stats["num_kv_blocks"] - stats["num_free_kv_blocks"]
        # kv_usage counts every live beam's table in full (a shared block once per beam holding it).
        usage = engine.kv_usage()
        unshared += (usage.capacity - usage.free) // stats["block_size"]
    return 1 - used / unshared if unshared else 0.0


def prefix_cache_run(llm, prefix_len: int, num_requests: int, max_tokens: int, seed: int = 0) -> dict:
    from quire import SamplingParams

    tokenizer = llm.get_tokenizer()
    stream = tokenizer.encode(" ".join(p.prompt for p in make_prompts("sharegpt-like", 8, seed=seed + 1)))
    prefix = stream[:prefix_len]
    assert len(prefix) == prefix_len
    prompts = [
        {"prompt_token_ids": prefix + tokenizer.encode(p.prompt, add_special_tokens=False)}
        for p in make_prompts("alpaca-like", num_requests, seed=seed)
    ]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.reset_prefix_cache()
    before = llm.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.stats()
    total_prompt = sum(len(p["prompt_token_ids"]) for p in prompts)
    return {
        "prompt_tokens": total_prompt,
        "computed": after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"],
        "seconds": elapsed,
        "requests_per_s": num_requests / elapsed,
        "texts": [o.outputs[0].token_ids for o in outputs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print_results(results, args.prefix_requests)
    return 0


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``measure`` (shared by ``python -m quire.bench.sharing`` and ``quire bench sharing``)."""
    parser.add_argument("--num-requests", type=int, default=200, help="requests per parallel-sampling simulation")
    parser.add_argument("--beam-requests", type=int, default=6, help="prompts per beam-search run (0: skip)")
    parser.add_argument("--beam-max-tokens", type=int, default=96, help="cap on a beam search's max_tokens")
    parser.add_argument("--prefix-requests", type=int, default=32, help="requests per prefix-cache run (0: skip)")
    parser.add_argument("--prefix-max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per setting (on and off alternate); min kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="HF model directory or .gguf (default: embedded SmolLM2)")


def measure(args: argparse.Namespace) -> dict:
    """Every figure of this benchmark, as a dict (see the module docstring)."""
    results: dict = {"parallel": {}, "beam": {}, "prefix": {}}
    model = getattr(args, "model", None)

    for dataset in ("alpaca-like", "sharegpt-like"):
        for n in (2, 4, 6):
            saving = parallel_sampling_savings(dataset, n, args.num_requests, args.seed)
            results["parallel"][f"{dataset} n={n}"] = round(100 * saving, 1)
    if args.beam_requests or args.prefix_requests:
        from quire import LLM

        if args.beam_requests:
            llm = LLM(model, dtype="float32", enable_prefix_caching=False)
            for dataset in ("alpaca-like", "sharegpt-like"):
                for width in (2, 4, 6):
                    saving = beam_search_savings(
                        llm, dataset, width, args.beam_requests, args.beam_max_tokens, args.seed
                    )
                    results["beam"][f"{dataset} width={width}"] = round(100 * saving, 1)
            del llm
        if args.prefix_requests:
            llm_on = LLM(model, dtype="float32", enable_prefix_caching=True)
            llm_off = LLM(model, dtype="float32", enable_prefix_caching=False)
            for llm in (llm_on, llm_off):  # warm up
                prefix_cache_run(llm, 80, 2, 2, seed=99)
            for prefix_len in (80, 341):
                runs = [
                    (
                        prefix_cache_run(llm_on, prefix_len, args.prefix_requests, args.prefix_max_tokens, args.seed),
                        prefix_cache_run(llm_off, prefix_len, args.prefix_requests, args.prefix_max_tokens, args.seed),
                    )
                    for _ in range(max(1, args.repeat))
                ]
                on = min((r[0] for r in runs), key=lambda r: r["seconds"])
                off = min((r[1] for r in runs), key=lambda r: r["seconds"])
                results["prefix"][f"prefix={prefix_len}"] = {
                    "prompt_tokens": off["prompt_tokens"],
                    "computed_off": off["computed"],
                    "computed_on": on["computed"],
                    "prefill_saved_pct": round(100 * (1 - on["computed"] / off["computed"]), 1),
                    "seconds_off": round(off["seconds"], 2),
                    "seconds_on": round(on["seconds"], 2),
                    "throughput_gain": round(off["seconds"] / on["seconds"], 2),
                    "outputs_equal": on["texts"] == off["texts"],
                }
    return results


def print_results(results: dict, prefix_requests: int) -> None:
    print(f"KV blocks saved by sharing / blocks needed without sharing (block size {BLOCK_SIZE})")
    for kind, label in (("parallel", "n"), ("beam", "width")):
        for key, value in results[kind].items():
            dataset, setting = key.split(" ")
            k = int(setting.split("=")[1])
            paper = f"   paper (Alpaca, OPT-13B): {PAPER_ALPACA[kind][k]:.1f}%" if dataset == "alpaca-like" else ""
            print(f"  {kind:8s} {dataset:14s} {label}={k}: {value:5.1f}%{paper}")
    for key, r in results["prefix"].items():
        plen = int(key.split("=")[1])
        print(
            f"  prefix cache, {plen}-token shared prefix, {prefix_requests} requests: prompt tokens computed "
            f"{r['computed_on']} vs {r['computed_off']} ({r['prefill_saved_pct']}% saved), "
            f"{r['seconds_on']}s vs {r['seconds_off']}s: {r['throughput_gain']}x throughput "
            f"(paper: {PAPER_PREFIX_SPEEDUP[plen]}x), outputs equal: {r['outputs_equal']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
