// decode_layers: a stack of rotary-family decoder layers (pre-norm, fused q|k|v, gated MLP) whose
// linears all take the block-format path, run in one call.
//
// Why: a one-token decode step of a small model spends as long in Python between the ops (seven
// calls a layer through the dispatcher, module lookups, tuple packing) as in the ops themselves.
// The loop below calls the very same functions in the same order as the Python layer loop
// (models/llama.py), so its results are bitwise those of that loop; only the glue is gone.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"

namespace quire_ops {

namespace {

constexpr int64_t kLinearsPerLayer = 4;  // q|k|v, o, gate|up, down

}  // namespace

// hidden [T, dim] and residual (None for the first layer; both are updated in place as the residual
// stream, as the Python loop does) in, (mlp output, residual) of the last
// layer out, as LlamaDecoderLayer.forward returns them. Per layer i: norms[2i], norms[2i + 1] (input
// and post-attention RMSNorm weights); linears[4i + j] with kinds[4i + j] and out_features[j].
std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& hidden, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, at::TensorList norms, at::TensorList linears, at::IntArrayRef kinds,
    at::IntArrayRef out_features, at::TensorList key_caches, at::TensorList value_caches,
    const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& query_start_loc,
    const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads, double scale, double eps, int64_t split_min_kv) {
  const int64_t layers = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(static_cast<int64_t>(value_caches.size()) == layers &&
                  static_cast<int64_t>(norms.size()) == 2 * layers &&
                  static_cast<int64_t>(linears.size()) == kLinearsPerLayer * layers &&
                  static_cast<int64_t>(kinds.size()) == kLinearsPerLayer * layers &&
                  static_cast<int64_t>(out_features.size()) == kLinearsPerLayer,
              "decode_layers: per layer 2 norms, 4 linears with their kinds, a key and a value cache; "
              "4 out_features");
  at::Tensor x = hidden;
  std::optional<at::Tensor> res = residual;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* lin = linears.data() + kLinearsPerLayer * i;
    const int64_t* kind = kinds.data() + kLinearsPerLayer * i;
    // add_rms_norm adds x into the residual in place (or, without one, x is the residual).
    at::Tensor normed = add_rms_norm(x, res, norms[2 * i], eps);
    if (!res.has_value()) res = x;
    at::Tensor qkv = quant_linear(normed, lin[0], kind[0], out_features[0]);
    at::Tensor kc = key_caches[i], vc = value_caches[i];
    at::Tensor attn = attend_qkv(qkv, cos, sin, kc, vc, slot_mapping, block_tables, query_start_loc, seq_lens,
                                 num_heads, num_kv_heads, scale, split_min_kv);
    at::Tensor o = quant_linear(attn, lin[1], kind[1], out_features[1]);
    normed = add_rms_norm(o, res, norms[2 * i + 1], eps);
    at::Tensor act = silu_and_mul(quant_linear(normed, lin[2], kind[2], out_features[2]));
    x = quant_linear(act, lin[3], kind[3], out_features[3]);
  }
  TORCH_CHECK(res.has_value(), "decode_layers: at least one layer expected");
  return {x, *res};
}

}  // namespace quire_ops

#ifndef QUIRE_PA_NAMESPACE
#define QUIRE_PA_NAMESPACE quire_pa
#endif

TORCH_LIBRARY_FRAGMENT(QUIRE_PA_NAMESPACE, m) {
  m.def(
      "decode_layers(Tensor(h!) hidden, Tensor(r!)? residual, Tensor? cos, Tensor? sin, Tensor[] norms, "
      "Tensor[] linears, int[] kinds, int[] out_features, Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor slot_mapping, Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, int num_heads, "
      "int num_kv_heads, float scale, float eps, int split_min_kv) -> (Tensor, Tensor)",
      &quire_ops::decode_layers);
}
