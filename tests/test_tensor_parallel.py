"""Tensor parallelism over torch.distributed (gloo, ranks on 127.0.0.1): same greedy outputs as one
rank, with prefix caching, preemption and copy-on-write active; a dead worker fails the engine loudly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from fidelity_utils import fidelity_prompts
from server_utils import ServerThread

from quire import LLM, SamplingParams
from quire.distributed.launch import WorkerDiedError
from quire.distributed.partition import head_shard, split_range

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
TOP = 5


def test_partition_covers_every_head_once_or_replicates():
    assert [split_range(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    # SmolLM2 on 2 ranks: KV heads 2 + 1, query heads follow their KV head.
    assert [head_shard(9, 3, 2, r) for r in range(2)] == [
        type(head_shard(9, 3, 2, 0))(range(0, 6), range(0, 2)),
        type(head_shard(9, 3, 2, 0))(range(6, 9), range(2, 3)),
    ]
    # Fewer KV heads than ranks: each KV head on 2 ranks, which split its query heads.
    shards = [head_shard(8, 2, 4, r) for r in range(4)]
    assert [s.kv_heads for s in shards] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [s.q_heads for s in shards] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError):
        head_shard(4, 2, 3, 0)


def _workload(tokenizer) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts sharing a long prefix (prefix-cache hits), a long one (chunked), and a seeded n=2 request
    (forked blocks, copy-on-write)."""
    prompts = fidelity_prompts(tokenizer)
    shared = prompts[7][:200]
    token_lists = [prompts[1], prompts[4], prompts[7], shared + prompts[0], shared + prompts[2], prompts[8]]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=TOP)
    params = [greedy] * len(token_lists)
    token_lists.append(prompts[5])
    params.append(SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=NEW_TOKENS))
    return [{"prompt_token_ids": p} for p in token_lists], params


def _assert_same_greedy(expected, actual) -> None:
    """Same tokens, or they part at a near tie (each side's token in the other's top-k); logprobs agree."""
    for exp, act in zip(expected, actual, strict=True):
        for e, a in zip(exp.outputs, act.outputs, strict=True):
            if e.logprobs is None:  # sampled: same logits and seeds give the same draws
                assert e.token_ids == a.token_ids
                continue
            for i, (mine, ref) in enumerate(zip(a.token_ids, e.token_ids, strict=True)):
                if mine != ref:
                    assert ref in a.logprobs[i] and mine in e.logprobs[i], f"token {i}: {mine} vs {ref} not a near tie"
                    break
                assert abs(a.logprobs[i][mine].logprob - e.logprobs[i][ref].logprob) < 1e-3


def _run(llm: LLM, tokenizer) -> list:
    prompts, params = _workload(tokenizer)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    return outputs


def _check_pressure(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["num_prefix_cache_hits"] > 0, stats


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir, tokenizer):
    llm = LLM(model=tiny_llama_dir, dtype="float32", block_size=8, num_kv_blocks=48, max_num_batched_tokens=128)
    outputs = _run(llm, tokenizer)
    _check_pressure(llm)
    return outputs


def test_tiny_llama_tp2_matches_tp1(tiny_llama_dir, tokenizer, tiny_reference):
    llm = LLM(
        model=tiny_llama_dir, dtype="float32", block_size=8, num_kv_blocks=48, max_num_batched_tokens=128,
        tensor_parallel_size=2,
    )
    try:
        assert llm.engine.cache.kv.shape[4] == 1  # 2 KV heads: one per rank
        _assert_same_greedy(tiny_reference, _run(llm, tokenizer))
        _check_pressure(llm)
        comm = llm.engine.group.stats
        assert comm.num_broadcasts == 1 + 2 * llm.stats()["num_steps"]  # cache size, then header + payload per step
    finally:
        llm.engine.shutdown()
    assert all(p.exitcode == 0 for p in llm.engine.workers.procs)


def test_default_model_tp2_matches_tp1(llm_fp32, tokenizer):
    """SmolLM2: 9 query / 3 KV heads split unevenly (6+2 and 3+1), GGUF weights sliced per rank."""
    reference = _run(llm_fp32, tokenizer)
    llm = LLM(dtype="float32", num_kv_blocks=26, max_num_batched_tokens=256, tensor_parallel_size=2)
    try:
        assert llm.engine.cache.kv.shape[4] == 2
        _assert_same_greedy(reference, _run(llm, tokenizer))
        _check_pressure(llm)
    finally:
        llm.engine.shutdown()


def test_replicated_kv_head_tp2_matches_tp1(tmp_path, tokenizer):
    """One KV head, two ranks: the KV head is replicated and each rank takes half the query heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": p} for p in fidelity_prompts(tokenizer)[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, logprobs=TOP)
    reference = LLM(model=str(tmp_path), dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(model=str(tmp_path), dtype="float32", tensor_parallel_size=2)
    try:
        _assert_same_greedy(reference, llm.generate(prompts, params, use_tqdm=False))
    finally:
        llm.engine.shutdown()


def test_killed_worker_fails_requests_and_health(tiny_llama_dir):
    """SIGKILL a worker mid-stream: the stream ends with an error, /health turns 500, nothing hangs."""
    from quire.engine.async_engine import AsyncLLMEngine
    from quire.entrypoints.openai.api_server import build_app

    llm_engine = LLM(model=tiny_llama_dir, dtype="float32", tensor_parallel_size=2).engine
    worker = llm_engine.workers.procs[0]
    engine = AsyncLLMEngine(llm_engine, log_stats_interval=None)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    result: dict = {}

    def stream(url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    result.setdefault("events", []).append(line)
                    if len(result["events"]) == 3:
                        os.kill(worker.pid, signal.SIGKILL)

    with ServerThread(build_app(engine, served_model_names=["tiny"])) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        reader = threading.Thread(target=stream, args=(server.url,), daemon=True)
        reader.start()
        reader.join(timeout=120)  # a hang fails here instead of blocking the suite
        assert not reader.is_alive(), "the stream did not end after the worker was killed"
        events = result["events"]
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2] and "rank 1" in events[-2], events[-2]
        assert len(events) < 400
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 500 and "tensor-parallel" in health.json()["error"]["message"]
    assert worker.exitcode == -signal.SIGKILL


def test_dead_worker_engine_raises_worker_died(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", tensor_parallel_size=2)
    engine = llm.engine
    engine.add_request("a", "hello there", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.check_health()
    engine.workers.procs[0].kill()
    engine.workers.procs[0].join(30)
    with pytest.raises(WorkerDiedError, match="rank 1"):  # noticed while idle, as /health asks
        engine.check_health()
    with pytest.raises(WorkerDiedError, match="rank 1"):
        while engine.has_unfinished_requests():
            engine.step()
    with pytest.raises(WorkerDiedError):  # stays failed
        engine.step()
    engine.shutdown()


def test_torchrun_env_rendezvous(tiny_llama_dir, tmp_path):
    """The multi-host launch path, on one host: torchrun starts both ranks, rank 0 prints the text."""
    args = ["generate", "Once upon a time", "--model", tiny_llama_dir, "--max-tokens", "12", "--temperature", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    single = subprocess.run(
        [sys.executable, "-m", "quire.entrypoints.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    both = subprocess.run(
        [*torchrun, "-m", "quire.entrypoints.cli", *args, "--tensor-parallel-size", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stdout == single.stdout and single.stdout.strip()
