// The ops of fused_ops.cpp that other translation units of the library call directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace quire_ops {

at::Tensor add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                        double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t kind, int64_t N);
at::Tensor attend_qkv(at::Tensor& qkv, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                      const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                      int64_t num_heads, int64_t num_kv_heads, double scale, int64_t split_min_kv);

}  // namespace quire_ops
