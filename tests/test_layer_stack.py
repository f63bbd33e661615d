"""The compiled layer stack (``decode_layers``) against the Python layer loop, on the real model.

They call the same ops in the same order, so hidden states and KV caches must agree bit for bit.
"""

from __future__ import annotations

import sys

import pytest
import torch

from quire.attention.torch_backend import TorchAttentionBackend
from quire.models.calibration import LinearPlan
from quire.models.layer_stack import LayerStack
from quire.models.loader import load_model_files
from quire.models.registry import build_model
from quire.worker.platform import Platform
from quire.worker.step_inputs import StepInputs

BLOCK_SIZE = 16
BLOCK_PATH = LinearPlan(quant_rows=sys.maxsize, small_rows=0, packed_from=1, packed_to=0)


@pytest.fixture(scope="module")
def loaded(default_model_path):
    return load_model_files(default_model_path)


def _step(tables: list[list[int]], starts: list[int], lens: list[int], ids: list[int]):
    loc = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    inputs = StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int32),
        query_start_loc=loc,
        starts=torch.tensor(starts, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        logit_rows=torch.zeros(0, dtype=torch.int32),
    )
    return inputs.batch(BLOCK_SIZE, Platform(torch.device("cpu")))[:3]


def _embed(model, ids, positions):
    hidden = model.embed_tokens(ids)
    return hidden, model.ops.rotary_tables(*model.rotary.lookup(positions), hidden.dtype)


def _loop(model, ids, positions, metadata, caches):
    hidden, rotary = _embed(model, ids, positions)
    residual = None
    for layer, kv in zip(model.layers, caches, strict=True):
        hidden, residual = layer.forward(hidden, residual, rotary, kv, metadata)
    return hidden, residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_stack_matches_the_layer_loop_bit_for_bit(loaded, dtype):
    # The block path at every row count, whatever this CPU's calibration chose.
    model = build_model(loaded, TorchAttentionBackend(), dtype, 512, torch.device("cpu"), plans={dtype: BLOCK_PATH})
    stack = LayerStack.build(model.layers, model.ops.kernels)
    assert stack is not None and stack.rows >= 3, "the default model's layers all have block-format paths"
    config = model.config
    shape = (12, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    prompt_lens = [5, 17, 40]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (sum(prompt_lens),), generator=gen).tolist()
    with torch.inference_mode():
        _loop(model, *_step(tables, [0, 0, 0], prompt_lens, prompt), caches)  # fill the caches
        starts = list(prompt_lens)
        for rows in (3, 1, 2):  # decode steps of a few sequences: the stack's case
            ids = torch.randint(0, config.vocab_size, (rows,), generator=gen).tolist()
            ids_t, positions, metadata = _step(tables[:rows], starts[:rows], [1] * rows, ids)
            before = [(k.clone(), v.clone()) for k, v in caches]
            want_hidden, want_residual = _loop(model, ids_t, positions, metadata, caches)
            got_hidden, got_residual = stack(*_embed(model, ids_t, positions), before, metadata)
            assert torch.equal(got_hidden, want_hidden) and torch.equal(got_residual, want_residual)
            for (k, v), (k2, v2) in zip(caches, before, strict=True):
                assert torch.equal(k, k2) and torch.equal(v, v2)
            starts[:rows] = [s + 1 for s in starts[:rows]]
    assert not torch.isnan(got_hidden).any()


def test_layer_stack_declines_what_its_loop_would_not_compute(loaded):
    """Without compiled kernels there is no stack; the model runs its Python loop."""
    model = build_model(loaded, TorchAttentionBackend(), torch.float32, 128, torch.device("cpu"))
    assert LayerStack.build(model.layers, None) is None
    assert LayerStack.build(model.layers[:0], model.ops.kernels) is None
