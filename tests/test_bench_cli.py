"""``quire bench ...``: every subcommand runs end to end on a tiny random model and writes its files.

The tiny model has its own word-level tokenizer over the benchmark corpus, so nothing here
loads the real model; the figures are meaningless, only the plumbing is checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from quire.bench.workload import CORPUS
from quire.entrypoints.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(" ".join(CORPUS.split()).split(" ")))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("tiny-bench-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _json(directory, name: str) -> dict:
    return json.loads((directory / f"{name}.json").read_text())


def test_memory_real_engine(tiny_model, tmp_path):
    code = cli_main(
        [
            "bench",
            "memory",
            "--model",
            tiny_model,
            "--num-requests",
            "6",
            "--kv-slots",
            "256",
            "--max-model-len",
            "64",
            "--results-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    report = _json(tmp_path, "memory")
    assert report["mode"] == "real"
    results = report["runs"][0]["results"]
    assert [r["allocator"] for r in results] == ["paged", "orca-max", "orca-pow2", "orca-oracle", "static"]
    for r in results:
        shares = r["shares"]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert r["request_throughput"] > 0
    assert report["step_model_fit"]["c0"] >= 0
    assert (tmp_path / "memory_fig2.png").stat().st_size > 0
    assert (tmp_path / "memory_fig13.png").stat().st_size > 0


def test_memory_simulated(tmp_path):
    code = cli_main(
        ["bench", "memory", "--simulate", "--num-requests", "40", "--results-dir", str(tmp_path), "--no-progress"]
    )
    assert code == 0
    report = _json(tmp_path, "memory")
    assert report["mode"] == "simulated" and len(report["runs"]) == 2
    batch = {r["allocator"]: r["mean_batched_requests"] for r in report["runs"][0]["results"]}
    assert batch["orca-max"] <= 15_700 // 2048  # Max reservations: at most 7 requests at once


def test_block_size_real_and_simulated(tiny_model, tmp_path):
    assert (
        cli_main(
            [
                "bench",
                "block-size",
                "--model",
                tiny_model,
                "--block-sizes",
                "4,16",
                "--num-requests",
                "5",
                "--kv-slots",
                "256",
                "--max-model-len",
                "64",
                "--results-dir",
                str(tmp_path / "real"),
                "--no-progress",
            ]
        )
        == 0
    )
    real = _json(tmp_path / "real", "block_size")
    assert real["runs"][0]["block_sizes"] == [4, 16]
    assert (
        cli_main(
            [
                "bench",
                "block-size",
                "--simulate",
                "--num-requests",
                "30",
                "--block-sizes",
                "16,256",
                "--results-dir",
                str(tmp_path / "sim"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "sim" / "block_size_fig18b.png").exists()


def test_kernel(tmp_path):
    assert (
        cli_main(
            [
                "bench",
                "kernel",
                "--batch-sizes",
                "1,4",
                "--context-lens",
                "64,128",
                "--min-time",
                "0.01",
                "--results-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    points = _json(tmp_path, "kernel")["points"]
    assert len(points) == 4
    assert all(p["max_abs_diff"] < 1e-3 for p in points)  # paged and contiguous attention agree
    assert (tmp_path / "kernel_fig18a.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton run is the real one, not the interpreter")
def test_kernel_on_the_triton_backend_under_the_interpreter(tmp_path):
    """The Fig. 18a command for a GPU, run here in Triton's interpreter: it computes what SDPA does.

    A subprocess, because the interpreter must be on before triton is first imported.
    """
    import os
    import subprocess
    import sys

    args = ["bench", "kernel", "--backend", "triton", "--batch-sizes", "2", "--context-lens", "40"]
    args += ["--min-time", "0.01", "--results-dir", str(tmp_path), "--no-progress"]
    script = "import sys; from quire.entrypoints.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    refused = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "TRITON_INTERPRET=1" in refused.stderr
    env["TRITON_INTERPRET"] = "1"
    subprocess.run([sys.executable, "-c", script, *args], env=env, check=True, capture_output=True, timeout=300)
    report = _json(tmp_path, "kernel")
    assert report["paged_impl"].startswith("Triton kernel on cpu")
    assert [(p["batch_size"], p["context_len"]) for p in report["points"]] == [(2, 40)]
    assert report["points"][0]["max_abs_diff"] < 1e-4  # the Triton kernel and contiguous SDPA agree


def test_throughput(tiny_model, tmp_path):
    code = cli_main(
        [
            "bench",
            "throughput",
            "--model",
            tiny_model,
            "--quick",
            "--num-requests",
            "4",
            "--single-output-len",
            "8",
            "--wait-idle",
            "0",
            "--hf-batch-size",
            "2",
            "--rounds",
            "2",
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = _json(tmp_path, "throughput")
    runs = {(r["engine"], r["round"]) for r in report["results"]}
    assert runs == {("quire", 0), ("transformers", 0), ("quire", 1), ("transformers", 1)}
    # The ratio is the median of the two within-round ratios.
    speedup = report["comparison"]["fp32_speedup"]
    by_round = [
        {r["engine"]: r["useful_output_tok_s"] for r in report["results"] if r["round"] == k} for k in (0, 1)
    ]
    want = [t["quire"] / t["transformers"] for t in by_round]
    assert speedup["per_round"] == pytest.approx(want)
    assert speedup["value"] == pytest.approx(sum(want) / 2)
    assert (tmp_path / "throughput.png").exists()


def test_throughput_speculative(tiny_model, tmp_path):
    """The speculative A/B: both engines time every task, and greedy output is the same with and without."""
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    argv = ["bench", "throughput", "--model", tiny_model, "--speculative", spec, "--single-output-len", "12",
            "--single-repeats", "2", "--wait-idle", "0", "--results-dir", str(tmp_path)]
    assert cli_main(argv) == 0
    report = _json(tmp_path, "throughput")["spec_decode"]
    assert report["speculative"]["num_speculative_tokens"] == 3
    assert report["tasks"], "no task produced two tokens"
    for task in report["tasks"]:
        assert task["identical"]
        assert len(task["plain_decode_s"]) == len(task["spec_decode_s"]) == 2
        assert {"plain_ms_per_token", "spec_ms_per_token", "speedup", "acceptance_rate"} <= task.keys()
        assert task["accepted_tokens"] <= task["draft_tokens"]


def test_sharing(tiny_model, tmp_path):
    code = cli_main(
        [
            "bench",
            "sharing",
            "--model",
            tiny_model,
            "--num-requests",
            "10",
            "--beam-requests",
            "1",
            "--beam-max-tokens",
            "4",
            "--prefix-requests",
            "2",
            "--prefix-max-tokens",
            "2",
            "--repeat",
            "1",
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = _json(tmp_path, "sharing")["results"]
    assert set(results["parallel"]) and set(results["beam"]) and set(results["prefix"])
    assert (tmp_path / "sharing_fig15.png").exists()


def test_contiguous_reservations_drive_the_real_engine_to_the_same_tokens(tiny_model):
    """An Orca allocator (``kv_allocator``) hands the engine consecutive blocks; greedy outputs must not change."""
    from quire.bench.datasets import TraceRequest, corpus_tokens
    from quire.bench.engine_setup import load_engine, load_tokenizer
    from quire.bench.trace_runner import EngineExecutor

    tokens = corpus_tokens(load_tokenizer(tiny_model))
    trace = [TraceRequest(tuple(tokens[i * 7 : i * 7 + 3 + 4 * i]), 5 + 3 * i, 0.0) for i in range(4)]

    def serve(kind) -> list[list[int]]:
        engine = load_engine(tiny_model, kv_slots=256, block_size=4, max_model_len=64, kv_allocator=kind)
        executor = EngineExecutor(engine)
        for i, request in enumerate(trace):
            executor.add(f"{kind}-{i}", request)
        outputs = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
        usage = engine.kv_usage()
        assert usage.token_states == usage.reserved == usage.internal_frag == 0  # all freed
        return [outputs[f"{kind}-{i}"] for i in range(len(trace))]

    paged = serve("paged")
    for kind in ("orca-max", "orca-pow2", "orca-oracle", "static"):
        assert serve(kind) == paged
    assert [len(t) for t in paged] == [r.output_len for r in trace]
