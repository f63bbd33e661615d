"""The device path's code, run on the CPU: device choice, the one-copy step upload, swaps through the
side stream, the profiling forward and pool sizing, and the padded decode-graph buffers.

On a CPU the streams and events are no-ops and graphs are not captured, but every line around them
runs here; the CUDA-only lines are listed in README's GPU section.
"""

from __future__ import annotations

import pytest
import torch

from quire.config import DEFAULT_GPU_MEMORY_UTILIZATION, EngineArgs, resolve_dtype
from quire.distributed.comm import TPGroup
from quire.engine.kv_sizing import kv_blocks_from_profile, needs_profile
from quire.models.config import ArchConfig
from quire.worker.cache_engine import CacheEngine
from quire.worker.cuda_graphs import DecodeGraphs, batch_buckets
from quire.worker.model_runner import ModelRunner
from quire.worker.platform import Platform, pack, rank_device, resolve_device, unpack
from quire.worker.profiling import profile_forward, profile_step
from quire.worker.step_inputs import StepInputs

CPU = Platform(torch.device("cpu"))


def test_auto_is_cuda_exactly_when_pytorch_sees_a_gpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert rank_device(torch.device("cpu"), 3) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_unknown_devices_are_refused_naming_the_field(name):
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_anything_loads():
    from quire import LLM

    with pytest.raises(ValueError, match="device='cuda'.*no CUDA device"):
        LLM(device="cuda")


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
def test_gpu_memory_utilization_is_checked(value):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(gpu_memory_utilization=value).validate()


def test_dtype_auto_depends_on_the_device():
    assert resolve_dtype("auto") == "float32"
    assert resolve_dtype("auto", "cuda", bf16_supported=True) == "bfloat16"
    assert resolve_dtype("auto", "cuda", bf16_supported=False) == "float16"
    assert resolve_dtype("float16", "cuda") == "float16"
    with pytest.raises(ValueError, match="float16.*not supported on CPU"):
        resolve_dtype("float16", "cpu")


def test_cpu_platform_runs_the_stream_and_event_calls():
    stream = CPU.new_stream()
    with CPU.use_stream(stream):
        x = torch.ones(4) * 2
    CPU.wait_stream(stream, CPU.current_stream())
    event = CPU.record_event(stream)
    event.wait(CPU.current_stream())
    assert event.query() and x.sum() == 8
    assert not CPU.pin_memory and CPU.dist_backend == "gloo"
    with CPU.measure_peak() as peak:
        torch.zeros(1000)
    assert peak == [None]
    free, total = CPU.memory()
    assert 0 < free <= total


def test_pack_and_unpack_round_trip_mixed_integer_tensors():
    tensors = [
        torch.tensor([3, 1, 4], dtype=torch.int64),
        torch.arange(12, dtype=torch.int32).view(3, 4),
        torch.zeros(0, dtype=torch.int32),
        torch.tensor([2**40, -5], dtype=torch.int64),
    ]
    buffer, layout = pack(tensors)
    assert buffer.dtype == torch.int64 and buffer.numel() == 3 + 12 + 0 + 2
    back = unpack(buffer, layout)
    for original, restored in zip(tensors, back, strict=True):
        assert restored.dtype == original.dtype and torch.equal(restored, original)


def test_tp_group_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="gloo or nccl"):
        TPGroup.connect("tcp://127.0.0.1:1", 0, 1, __import__("datetime").timedelta(seconds=1), backend="mpi")


def _arch(**overrides) -> ArchConfig:
    fields = dict(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return ArchConfig(**fields)


def test_swaps_restore_blocks_exactly_through_the_block_major_host_pool():
    torch.manual_seed(0)
    cache = CacheEngine(_arch(), num_blocks=10, block_size=4, dtype=torch.float32, device=torch.device("cpu"),
                        num_host_blocks=6)
    cache.kv.copy_(torch.randn_like(cache.kv))
    original = cache.kv.clone()
    cache.apply_block_ops({"blocks_to_swap_out": torch.tensor([[2, 5], [7, 0], [3, 4]], dtype=torch.int32)})
    assert torch.equal(cache.host_kv[5], original[:, :, 2]) and torch.equal(cache.host_kv[0], original[:, :, 7])
    cache.kv[:, :, [2, 7, 3]] = 0  # the device blocks go to other sequences
    cache.apply_block_ops({"blocks_to_swap_in": [(5, 8), (0, 1), (4, 9)], "blocks_to_copy": [(8, 6)]})
    cache.wait_for_copies()
    for host_src, dev in ((2, 8), (7, 1), (3, 9), (2, 6)):
        assert torch.equal(cache.kv[:, :, dev], original[:, :, host_src]), (host_src, dev)
    untouched = [b for b in range(10) if b not in (1, 2, 3, 6, 7, 8, 9)]
    assert torch.equal(cache.kv[:, :, untouched], original[:, :, untouched])


def test_pool_size_from_a_profile_follows_the_utilization_rule():
    from quire.config import CacheConfig

    cache = CacheConfig(block_size=16, num_kv_blocks=None, kv_cache_memory_gb=None, enable_prefix_caching=True,
                        gpu_memory_utilization=0.5)
    _, total = CPU.memory()
    per_block = 2**20
    peak = 2**30
    assert kv_blocks_from_profile(cache, per_block, CPU, peak) == (int(total * 0.5) - peak) // per_block
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5.*no room for KV blocks"):
        kv_blocks_from_profile(cache, per_block, CPU, total)
    assert not needs_profile(cache, CPU)  # a CPU pool keeps its own default budget
    assert EngineArgs().gpu_memory_utilization == DEFAULT_GPU_MEMORY_UTILIZATION


def test_profile_step_covers_the_largest_step():
    step = profile_step(num_tokens=50, block_size=16, logit_rows=8)
    assert step.block_tables.tolist() == [[0, 1, 2, 3]]
    assert step.logit_rows.tolist() == list(range(42, 50))
    assert step.query_start_loc.tolist() == [0, 50]


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from quire.attention.torch_backend import TorchAttentionBackend
    from quire.models.loader import load_model_files
    from quire.models.registry import build_model

    loaded = load_model_files(tiny_llama_dir)
    return build_model(loaded, TorchAttentionBackend(), torch.float32, 256, torch.device("cpu"))


def test_the_profiling_forward_runs_the_largest_step(tiny_model):
    args = EngineArgs(max_num_batched_tokens=96, max_num_seqs=4, max_model_len=256)
    config = args.create_config("unused", 256, "float32")
    arch = tiny_model.config
    # On a CPU there is no peak figure, but the whole step ran (a failure would raise here).
    assert profile_forward(tiny_model, arch, torch.float32, CPU, config, arch.num_kv_heads) is None


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[-3:] == [240, 248, 256]


def _prefill(runner: ModelRunner, lengths: list[int], block_size: int, tables: list[list[int]]) -> None:
    torch.manual_seed(1)
    vocab = runner.model.config.vocab_size
    ids = torch.randint(0, vocab, (sum(lengths),), dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    width = max(len(t) for t in tables)
    runner.run(StepInputs(
        input_ids=ids, query_start_loc=qsl, starts=torch.zeros(len(lengths), dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        logit_rows=torch.zeros(0, dtype=torch.int32),
    ))


def _decode(lengths: list[int], tables: list[list[int]], tokens: list[int]) -> StepInputs:
    width = max(len(t) for t in tables)
    return StepInputs(
        input_ids=torch.tensor(tokens, dtype=torch.int32),
        query_start_loc=torch.arange(len(lengths) + 1, dtype=torch.int32),
        starts=torch.tensor(lengths, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        logit_rows=torch.arange(len(lengths), dtype=torch.int32),
    )


def test_padded_decode_buffers_give_the_unpadded_forward(tiny_model):
    """The decode-graph path, run eagerly: padding rows go to the scratch block, real rows compute
    exactly what the plain forward does, and rows a larger step left behind are reset."""
    block_size, num_blocks = 4, 24
    arch = tiny_model.config
    cache = CacheEngine(arch, num_blocks + 1, block_size, torch.float32, torch.device("cpu"))
    runner = ModelRunner(tiny_model, cache, sampler=None)
    lengths = [5, 9, 3, 12, 7]
    tables, nxt = [], 0
    for n in lengths:
        need = -(-(n + 2) // block_size)  # room for two decode tokens
        tables.append(list(range(nxt, nxt + need)))
        nxt += need
    assert nxt <= num_blocks
    _prefill(runner, lengths, block_size, tables)
    graphs = DecodeGraphs(tiny_model, cache.layers, scratch_block=num_blocks, block_size=block_size,
                          max_blocks_per_seq=8, max_batch=8, device=torch.device("cpu"), capture=False)
    graphed = ModelRunner(tiny_model, cache, sampler=None, graphs=graphs)

    five = _decode(lengths, tables, [1, 2, 3, 4, 5])
    ids, pos, meta, _ = five.batch(block_size, CPU)
    assert graphs.fits(ids.shape[0], meta)
    kv_before = cache.kv.clone()
    expected = tiny_model(ids, pos, cache.layers, meta)
    kv_plain = cache.kv.clone()
    cache.kv.copy_(kv_before)
    got = graphs.forward(ids, pos, meta)  # bucket 8: three padding rows
    assert torch.equal(got, expected)
    real = [b for b in range(num_blocks)]
    assert torch.equal(cache.kv[:, :, real], kv_plain[:, :, real]), "padding rows wrote only the scratch block"

    # A smaller step after a larger one: rows 3.. of the buffers must be padding again.
    lengths3 = [n + 1 for n in lengths[:3]]
    three = _decode(lengths3, tables[:3], [6, 7, 8])
    logits = graphed.run(three)
    assert graphs.slot_mapping[3].item() == num_blocks * block_size
    assert graphs.seq_lens[3].item() == 1 and graphs.block_tables[3].eq(num_blocks).all()
    ids3, pos3, meta3, _ = three.batch(block_size, CPU)
    assert torch.equal(logits, tiny_model.compute_logits(tiny_model(ids3, pos3, cache.layers, meta3)))
    # A prefill chunk is not a decode step: it takes the plain path.
    assert not graphs.fits(6, StepInputs(
        input_ids=torch.zeros(6, dtype=torch.int32), query_start_loc=torch.tensor([0, 6], dtype=torch.int32),
        starts=torch.zeros(1, dtype=torch.int32), block_tables=torch.tensor([[20, 21]], dtype=torch.int32),
        logit_rows=torch.zeros(0, dtype=torch.int32)).batch(block_size, CPU)[2])
