"""Benchmark the CPU paged-attention kernel against the PyTorch reference.

    python -m quire.bench.attention_kernel [--threads 2] [--min-time 1.0]

Cases (9 query heads / 3 kv heads, head_dim 64, block_size 16, physical
blocks shuffled):

* decode: 64 sequences, one new token each, KV lengths uniform in 16..512;
* prefill: 4 sequences of 256 new tokens without cached context, and the same
  chunk on top of 512 cached tokens;

each for float32 and bfloat16 caches, and a decode step over 30 layers whose K/V does not fit
in the caches (``--dram-layers``; the kernel only).  Three implementations are timed:

* ``kernel``    - quire.kernels.cpu_kernel.paged_attention;
* ``reference`` - quire.attention.reference.paged_attention_reference (float32
  math, Python loop over sequences);
* ``gather+sdpa`` - a leaner torch path for comparison: gather K/V per sequence
  through the block table and call SDPA in the cache dtype (is_causal when there
  is no cached context).

"ms/call" is the median, "best ms" the fastest call.  "GB/s" is effective
bandwidth at the median: bytes of K/V the call must read (each sequence's KV
length x kv heads x head_dim x 2 tensors) plus query and output bytes, divided
by the time per call.  The load average is printed because other processes on
the same cores distort multi-threaded timings badly (an OpenMP region waits
for its slowest thread).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quire.attention.reference import paged_attention_reference
from quire.kernels import cpu_kernel

NUM_Q_HEADS = 9
NUM_KV_HEADS = 3
HEAD_DIM = 64
BLOCK_SIZE = 16


@dataclass
class Case:
    name: str
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    scale: float

    @property
    def args(self) -> tuple:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
            self.scale,
        )

    def bytes_moved(self) -> int:
        elt = self.query.element_size()
        kv = int(self.seq_lens.sum()) * NUM_KV_HEADS * HEAD_DIM * elt * 2
        return kv + 2 * self.query.numel() * elt


def make_case(name: str, query_lens: list[int], seq_lens: list[int], dtype: torch.dtype, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 8
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        block_tables[s, :nb] = torch.tensor(perm[used : used + nb], dtype=torch.int32)
        used += nb
    num_tokens = sum(query_lens)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return Case(
        name=name,
        query=torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(dtype),
        key_cache=torch.randn(shape, generator=gen).to(dtype),
        value_cache=torch.randn(shape, generator=gen).to(dtype),
        block_tables=block_tables,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        scale=HEAD_DIM**-0.5,
    )


def gather_sdpa(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Gather through the block table, SDPA in the cache dtype (comparison only)."""
    out = torch.empty_like(query)
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    group = query.shape[1] // num_kv_heads
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = qsl[s], qsl[s + 1]
        query_len = q_end - q_begin
        ids = block_tables[s, : (seq_len + block_size - 1) // block_size].long()
        k = key_cache[ids].flatten(0, 1)[:seq_len].transpose(0, 1)
        v = value_cache[ids].flatten(0, 1)[:seq_len].transpose(0, 1)
        q = query[q_begin:q_end].transpose(0, 1)
        if query_len == seq_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            q_pos = torch.arange(query_len).unsqueeze(1) + (seq_len - query_len)
            mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[q_begin:q_end] = o.transpose(0, 1)
    return out


def time_call(fn: Callable[[], object], min_time: float, min_iters: int = 5) -> tuple[float, float]:
    """(median, best) seconds per call over at least min_iters calls and min_time seconds."""
    fn()  # warm-up
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10_000:
            break
    return statistics.median(samples), min(samples)


def bench_cases(dtype: torch.dtype) -> list[Case]:
    rng = random.Random(1234)
    tag = "fp32" if dtype == torch.float32 else "bf16"
    decode_lens = [rng.randint(16, 512) for _ in range(64)]
    return [
        make_case(f"decode  64 seqs kv 16..512 {tag}", [1] * 64, decode_lens, dtype),
        make_case(f"prefill 4x256 new, no ctx  {tag}", [256] * 4, [256] * 4, dtype),
        make_case(f"prefill 4x256 new, 512 ctx {tag}", [256] * 4, [768] * 4, dtype),
    ]


def dram_decode_step(dtype: torch.dtype, layers: int, min_time: float) -> tuple[float, int]:
    """(median seconds, K/V bytes) of one decode step's attention over ``layers`` layers.

    41 sequences of 40..400 positions, one cache per layer, called in turn as the model does: the
    K/V of all layers (433 MB in float32) is far larger than L3, so this measures how well the
    kernel overlaps DRAM reads with its arithmetic, which the one-layer cases above cannot.
    """
    rng = random.Random(0)
    seq_lens = [rng.randint(40, 400) for _ in range(41)]
    cases = [make_case("", [1] * len(seq_lens), seq_lens, dtype, seed=layer) for layer in range(layers)]
    out = torch.empty_like(cases[0].query)

    def step() -> None:
        for case in cases:
            cpu_kernel.paged_attention(*case.args, out=out)

    median, _ = time_call(step, min_time)
    return median, sum(c.bytes_moved() for c in cases)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--dram-layers", type=int, default=30, help="layers of the DRAM-resident decode step (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    available = cpu_kernel.is_available()
    load_s = time.perf_counter() - t0
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}, load avg {load1:.2f}")
    print(f"kernel available: {available} (build/load {load_s:.1f}s)")

    header = f"{'case':34s} {'impl':12s} {'ms/call':>9s} {'best ms':>9s} {'GB/s':>7s} {'vs ref':>7s} {'max|err|':>9s}"
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.bfloat16):
        for case in bench_cases(dtype):
            expected = paged_attention_reference(*case.args)
            impls: list[tuple[str, Callable[[], torch.Tensor]]] = []
            if available:
                out = torch.empty_like(case.query)
                impls.append(("kernel", lambda c=case, o=out: cpu_kernel.paged_attention(*c.args, out=o)))
            impls.append(("reference", lambda c=case: paged_attention_reference(*c.args)))
            impls.append(("gather+sdpa", lambda c=case: gather_sdpa(*c.args)))
            ref_time = None
            results = []
            for name, fn in impls:
                median, best = time_call(fn, args.min_time)
                err = (fn().float() - expected.float()).abs().max().item()
                if name == "reference":
                    ref_time = median
                results.append((name, median, best, err))
            for name, median, best, err in results:
                gbps = case.bytes_moved() / median / 1e9
                speedup = f"{ref_time / median:6.1f}x" if ref_time else ""
                print(
                    f"{case.name:34s} {name:12s} {median * 1e3:9.3f} {best * 1e3:9.3f} {gbps:7.2f} "
                    f"{speedup:>7s} {err:9.2e}"
                )
            print()
    if available and args.dram_layers > 0:
        for dtype in (torch.float32, torch.bfloat16):
            seconds, moved = dram_decode_step(dtype, args.dram_layers, args.min_time)
            print(
                f"decode step, 41 seqs x {args.dram_layers} layers, K/V in DRAM, {dtype}: "
                f"{seconds * 1e3:.2f} ms, {moved / seconds / 1e9:.1f} GB/s"
            )


if __name__ == "__main__":
    main()
