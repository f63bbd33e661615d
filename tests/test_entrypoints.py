"""The `quire` command's structure, without loading a model: what `quire serve` imports, and which
flags exist with which defaults. (No import cycle among them: tests/test_import_graph.py.)"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import quire
from quire.config import EngineArgs
from quire.entrypoints.cli import build_parser
from quire.entrypoints.engine_args import engine_kwargs
from quire.sampling_params import SamplingParams

ROOT = Path(quire.__file__).resolve().parent.parent

# The real `quire serve` (default model, a small KV pool) under `python -X importtime`, which logs
# every module the process imports to stderr: what a user's server loads, with nothing stubbed.
SERVE = "import sys; from quire.entrypoints.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_quire_serve_imports_neither_bench_nor_rich_nor_matplotlib(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "stderr.log"
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "64"]
    with log.open("w") as err:
        server = subprocess.Popen([sys.executable, "-X", "importtime", "-c", SERVE, *args], env=env, stderr=err)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            else:
                raise AssertionError(f"quire serve did not come up: {log.read_text()[-2000:]}")
        finally:
            server.terminate()
            server.wait(timeout=60)
    lines = log.read_text().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "fastapi" in imported and "quire.engine.llm_engine" in imported, "the import log is read"
    heavy = sorted(m for m in imported if m.split(".")[0] in ("rich", "matplotlib") or m.startswith("quire.bench"))
    assert heavy == []


# Every flag the commands had before their flags were generated from EngineArgs.
SERVE_FLAGS = {
    "--host", "--port", "--api-key", "--served-model-name", "--log-stats-interval", "--uvicorn-log-level",
}
GENERATE_FLAGS = {
    "--chat", "--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty",
    "--sampling-seed", "--stop", "--ignore-eos",
}
ENGINE_FLAGS = {
    "--model", "--dtype", "--block-size", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--seed",
    "--kv-cache-memory-gb", "--num-kv-blocks", "--enable-prefix-caching", "--no-enable-prefix-caching",
    "--num-threads", "--tensor-parallel-size", "-tp", "--swap-space", "--num-host-kv-blocks", "--preemption-mode",
    "--scheduling-policy", "--priority-aging-steps", "--kv-allocator", "--attention-backend", "--speculative-config",
    "--device", "--gpu-memory-utilization", "--enforce-eager", "--no-enforce-eager",
}


def _subparser(command: str):
    parser = build_parser([command])
    return parser._subparsers._group_actions[0].choices[command]


def _flags(command: str) -> set[str]:
    return {flag for action in _subparser(command)._actions for flag in action.option_strings} - {"-h", "--help"}


def test_flag_names_are_kept():
    assert _flags("serve") == SERVE_FLAGS | ENGINE_FLAGS
    assert _flags("generate") == GENERATE_FLAGS | ENGINE_FLAGS


def test_engine_flag_defaults_are_engine_args_defaults():
    for argv in (["serve"], ["generate", "hi"]):
        args = build_parser(argv).parse_args(argv)
        assert engine_kwargs(args) == dataclasses.asdict(EngineArgs())
    args = build_parser(["serve"]).parse_args(
        ["serve", "m.gguf", "-tp", "2", "--no-enable-prefix-caching", "--swap-space", "1.5", "--num-kv-blocks", "8"]
    )
    kwargs = engine_kwargs(args)
    assert (kwargs["tensor_parallel_size"], kwargs["enable_prefix_caching"]) == (2, False)
    assert (kwargs["swap_space"], kwargs["num_kv_blocks"], args.model_tag) == (1.5, 8, "m.gguf")
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineArgs))


def test_generate_sampling_defaults_are_sampling_params_but_greedy_and_longer():
    args = build_parser(["generate", "hi"]).parse_args(["generate", "hi"])
    given = {name: getattr(args, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p")}
    defaults = SamplingParams()
    assert given == {"max_tokens": 64, "temperature": 0.0, "top_p": defaults.top_p, "top_k": defaults.top_k,
                     "min_p": defaults.min_p}
    assert args.sampling_seed is None and args.stop == [] and not args.ignore_eos


def test_only_the_chosen_subcommand_is_filled_in():
    parser = build_parser(["env"])
    choices = parser._subparsers._group_actions[0].choices
    assert set(choices) == {"serve", "generate", "env", "bench"}
    assert len(choices["bench"]._actions) == 1  # only -h: quire.bench.cli was not consulted
