// Fused element-wise ops for the Llama layer on CPU (float32 is the fast case: the bfloat16 paths
// convert element by element and lose to PyTorch's vectorised ops, so the model uses them only in float32): each replaces a chain of small PyTorch ops
// (and their temporaries) by one pass over the data. float32 and bfloat16; math in float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace quire_ops {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// out = rms_norm(x + residual) * weight; residual <- x + residual (rounded to T, as an unfused add would).
// Without a residual: out = rms_norm(x) * weight.
template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                       at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * dim;
      float sum_sq = 0.f;
      if (rp != nullptr) {
        T* rr = rp + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const T added = static_cast<T>(to_float(xr[d]) + to_float(rr[d]));
          rr[d] = added;
          row[d] = to_float(added);
          sum_sq += row[d] * row[d];
        }
      } else {
        for (int64_t d = 0; d < dim; ++d) {
          row[d] = to_float(xr[d]);
          sum_sq += row[d] * row[d];
        }
      }
      const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(dim) + static_cast<float>(eps));
      T* orow = op + r * dim;
      for (int64_t d = 0; d < dim; ++d) orow[d] = static_cast<T>(row[d] * inv * to_float(wp[d]));
    }
  });
}

void add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  at::Tensor& out, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous 2-D tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(),
              "add_rms_norm: dtypes must match");
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x");
  }
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_impl<float>(x, residual, weight, out, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_impl<c10::BFloat16>(x, residual, weight, out, eps);
  } else {
    TORCH_CHECK(false, "add_rms_norm: float32 or bfloat16 expected");
  }
}

// Rotate, in place, the first num_heads heads of every row of x [T, row_width] (half-split layout):
// (x1, x2) <- (x1 cos - x2 sin, x2 cos + x1 sin), with cos/sin [T, head_dim / 2] float32.
template <typename T>
void rotary_impl(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim) {
  const int64_t rows = x.size(0), stride = x.stride(0), half = head_dim / 2;
  T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * half;
      const float* s = sp + r * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        T* head = xp + r * stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(head[i]), x2 = to_float(head[i + half]);
          head[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          head[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

void rotary_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                    int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) >= num_heads * head_dim && head_dim % 2 == 0,
              "rotary_inplace: x [T, >= num_heads * head_dim] with contiguous rows expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) == head_dim / 2,
              "rotary_inplace: cos/sin float32 [T, head_dim / 2] expected");
  if (x.scalar_type() == at::kFloat) {
    rotary_impl<float>(x, cos, sin, num_heads, head_dim);
  } else if (x.scalar_type() == at::kBFloat16) {
    rotary_impl<c10::BFloat16>(x, cos, sin, num_heads, head_dim);
  } else {
    TORCH_CHECK(false, "rotary_inplace: float32 or bfloat16 expected");
  }
}

}  // namespace quire_ops

#ifndef QUIRE_PA_NAMESPACE
#define QUIRE_PA_NAMESPACE quire_pa
#endif

TORCH_LIBRARY_FRAGMENT(QUIRE_PA_NAMESPACE, m) {
  m.def("add_rms_norm(Tensor x, Tensor(b!)? residual, Tensor weight, Tensor(a!) out, float eps) -> ()",
        &quire_ops::add_rms_norm);
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int num_heads, int head_dim) -> ()",
        &quire_ops::rotary_inplace);
}
