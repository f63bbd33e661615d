"""config.json → ``ArchConfig``, per family (the names differ: GPT-2's ``n_embd``, OPT's ``ffn_dim`` ...)."""

from __future__ import annotations

from collections.abc import Callable

from quire.models.config import ArchConfig


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict) -> dict | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling)


def as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _rotary(raw: dict, eos, architecture: str) -> ArchConfig:
    num_heads = raw["num_attention_heads"]
    attention_bias = bool(raw.get("attention_bias", False))
    window = raw.get("sliding_window")
    if architecture.startswith("Qwen") and not raw.get("use_sliding_window", False):
        window = None
    return ArchConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        rope_scaling=_rope_scaling(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=as_tuple(eos),
        architecture=architecture,
        qkv_bias=True if architecture == "Qwen2ForCausalLM" else attention_bias,
        o_bias=False if architecture == "Qwen2ForCausalLM" else attention_bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=window,
        hidden_act=raw.get("hidden_act", "silu"),
    )


def _opt(raw: dict, eos, architecture: str) -> ArchConfig:
    if not raw.get("enable_bias", True) or not raw.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT without biases or LayerNorm affine parameters is not supported")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    proj = raw.get("word_embed_proj_dim") or hidden
    return ArchConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["ffn_dim"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,  # nn.LayerNorm's default, which OPT uses
        rope_theta=0.0,
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=as_tuple(eos),
        architecture=architecture,
        hidden_act=raw.get("activation_function", "relu"),
        do_layer_norm_before=raw.get("do_layer_norm_before", True),
        word_embed_proj_dim=proj if proj != hidden else None,
    )


def _gpt2(raw: dict, eos, architecture: str) -> ArchConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            raise ValueError(f"GPT-2 with {flag} is not supported")
    if not raw.get("scale_attn_weights", True):
        raise ValueError("GPT-2 without scale_attn_weights is not supported")
    hidden, heads = raw["n_embd"], raw["n_head"]
    return ArchConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("n_inner") or 4 * hidden,
        num_layers=raw["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        rms_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        rope_theta=0.0,
        max_position_embeddings=raw.get("n_positions", 1024),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=as_tuple(eos),
        architecture=architecture,
        hidden_act=raw.get("activation_function", "gelu_new"),
    )


PARSERS: dict[str, Callable[[dict, object, str], ArchConfig]] = {
    "LlamaForCausalLM": _rotary,
    "MistralForCausalLM": _rotary,
    "Qwen2ForCausalLM": _rotary,
    "Qwen3ForCausalLM": _rotary,
    "OPTForCausalLM": _opt,
    "GPT2LMHeadModel": _gpt2,
}


def arch_config_from_hf(raw: dict, eos) -> ArchConfig:
    """``eos`` is generation_config.json's ``eos_token_id`` when it has one, else config.json's."""
    architecture = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
    parser = PARSERS.get(architecture)
    if parser is None:
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {sorted(PARSERS)})")
    return parser(raw, eos, architecture)
