"""A tensor-parallel worker (rank > 0): its shard of the model and the KV cache, fed by the driver.

The loop is: wait for the driver's next ``StepInputs``, run the same ``ModelRunner.run`` as the
driver (block operations, forward, logits that the LM head gathers on the driver), repeat. The
worker keeps no request state: everything it needs arrives with each step. It exits when the
driver sends stop, or with an error when a collective fails (the driver died).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from quire.attention.selector import build_attention_backend
from quire.config import DTYPES, EngineArgs
from quire.distributed.comm import TPGroup
from quire.distributed.launch import COLLECTIVE_TIMEOUT, Rendezvous
from quire.distributed.partition import head_shard
from quire.models.loader import load_model_files, resolve_model_path
from quire.models.registry import build_model
from quire.worker.cache_engine import CacheEngine
from quire.worker.cuda_graphs import build_decode_graphs, uses_decode_graphs
from quire.worker.model_runner import ModelRunner
from quire.worker.platform import Platform, rank_device, resolve_device
from quire.worker.step_inputs import StepInputs

logger = logging.getLogger(__name__)

# The engine dtypes by name, in the order their index travels to the workers.
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}


def threads_per_rank(args: EngineArgs) -> int:
    """``num_threads``, or this host's cores shared by the ranks on it (spawned ranks share one host)."""
    if args.num_threads:
        return args.num_threads
    return max(1, (os.cpu_count() or 1) // args.tensor_parallel_size)


def run_worker(args: EngineArgs, rendezvous: Rendezvous) -> None:
    """Serve steps until the driver stops the group; raises if the group breaks."""
    torch.set_num_threads(threads_per_rank(args))
    platform = Platform(rank_device(resolve_device(args.device), rendezvous.rank))
    device = platform.device
    group = TPGroup.connect(
        rendezvous.init_method, rendezvous.rank, rendezvous.size, COLLECTIVE_TIMEOUT, platform.dist_backend
    )
    loaded = load_model_files(resolve_model_path(args.model))
    # The driver decides the cache size and context length for every rank.
    header = group.broadcast(torch.zeros(5, dtype=torch.int64)).tolist()
    num_blocks, block_size, max_model_len, dtype_code, num_host_blocks = header
    dtype = list(TORCH_DTYPES.values())[dtype_code]
    attention = build_attention_backend(args.attention_backend, device)
    model = build_model(loaded, attention, dtype, max_model_len, device, group)
    del loaded
    config = model.config
    heads = len(head_shard(config.num_heads, config.num_kv_heads, group.size, group.rank).kv_heads)
    # The same block count as the driver's pool, scratch block of the decode graphs included.
    graphed = uses_decode_graphs(args, platform)
    cache = CacheEngine(config, num_blocks + int(graphed), block_size, dtype, device, heads, num_host_blocks)
    graphs = build_decode_graphs(args, platform, model, cache, num_blocks, max_model_len)
    runner = ModelRunner(model, cache, None, group, graphs)
    while (inputs := StepInputs.receive(group)) is not None:
        runner.run(inputs)


def worker_main(args: EngineArgs, rendezvous: Rendezvous) -> None:
    """Entry point of a spawned worker process: exit code 0 on stop, 1 (after logging why) on failure."""
    logging.basicConfig(level=logging.WARNING, format=f"quire-tp-worker-{rendezvous.rank}: %(message)s")
    try:
        run_worker(args, rendezvous)
    except Exception as exc:
        logger.error("tensor-parallel worker rank %d stopped: %s", rendezvous.rank, exc)
        sys.exit(1)
