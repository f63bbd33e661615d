"""A rotary-family layer stack run in one compiled call when every linear takes the block path.

A one-token decode step of a small model spends about as long in Python between the ops as in
them (seven dispatcher calls a layer, module lookups, tuple packing: ~2 ms of a ~5 ms step for the
default model's 30 layers). ``decode_layers`` (``csrc/decode_stack.cpp``) runs the same ops in the
same order in C++, so its results are bitwise those of the Python loop; it applies only where that
loop would call exactly those ops: fused attention without q/k norms, no biases, one rank, and
a step small enough for every linear's block-format path.
"""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionMetadata


class LayerStack:
    """The weights of a stack of ``LlamaDecoderLayer``s as ``decode_layers`` takes them."""

    def __init__(self, layers, kernels) -> None:
        attn = layers[0].self_attn
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.scale = attn.num_heads, attn.num_kv_heads, attn.scale
        self.eps = layers[0].input_layernorm.eps
        dtype = layers[0].input_layernorm.weight.dtype
        self.split_min_kv = attn.backend.split_min_kv(attn.num_heads, attn.num_kv_heads, attn.head_dim, dtype)
        norms = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in layers]
        self.norms = [n.weight.detach() for pair in norms for n in pair]
        linears = [lin for layer in layers for lin in _linears(layer)]
        self.rows = min(lin.block_rows for lin in linears)
        weights = [lin.block_weight() for lin in linears]
        self.linears = [w for w, _ in weights]
        self.kinds = [k for _, k in weights]
        self.out_features = [lin.out_features for lin in linears[:4]]

    @classmethod
    def build(cls, layers, kernels) -> LayerStack | None:
        """The stack of ``layers`` (prepared), or None where the compiled loop would not make the
        Python loop's calls: no kernels, a layer with unfused attention, q/k norms, a bias, more
        than one rank, or a linear without the block path."""
        if kernels is None or not hasattr(kernels, "decode_layers") or not len(layers):
            return None
        first = layers[0].self_attn
        for layer in layers:
            attn = layer.self_attn
            if not (attn.fused and attn.rotary) or attn.qk_norm or attn.o_proj.group.size != 1:
                return None
            if (attn.num_heads, attn.num_kv_heads, attn.scale) != (first.num_heads, first.num_kv_heads, first.scale):
                return None
            if {layer.input_layernorm.eps, layer.post_attention_layernorm.eps} != {layers[0].input_layernorm.eps}:
                return None
            if any(lin.bias is not None or not lin.block_rows for lin in _linears(layer)):
                return None
            if [lin.out_features for lin in _linears(layer)] != [lin.out_features for lin in _linears(layers[0])]:
                return None
        return cls(layers, kernels)

    def __call__(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last layer's MLP output, the residual stream before it), as the layer loop returns them."""
        return self.kernels.decode_layers(
            hidden,
            None,
            rotary[0],
            rotary[1],
            self.norms,
            self.linears,
            self.kinds,
            self.out_features,
            [k for k, _ in kv_caches],
            [v for _, v in kv_caches],
            metadata.slot_mapping,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            self.num_heads,
            self.num_kv_heads,
            self.scale,
            self.eps,
            self.split_min_kv,
        )


def _linears(layer):
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
