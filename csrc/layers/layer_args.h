// The layer-op contracts (ops.h), checked once for the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>

#include "core/checks.h"

namespace pagedinfer {

// input/out [num_tokens, hidden] (any leading dims, last dim contiguous), weight [hidden].
inline void check_rms_norm_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                double eps) {
  check_float_dtype(input, "input");
  check_same_dtype(out, input, "out", "input");
  check_same_dtype(weight, input, "weight", "input");
  check_same_device(out, input, "out", "input");
  check_same_device(weight, input, "weight", "input");
  PI_CHECK(input.dim() >= 1 && (input.stride(-1) == 1 || input.size(-1) <= 1), "input must have a contiguous last dim, got strides ",
           input.strides());
  check_contiguous(out, "out");
  check_contiguous(weight, "weight");
  PI_CHECK(out.sizes() == input.sizes(), "out must have input's shape ", input.sizes(), ", got ", out.sizes());
  check_dim(weight, 1, "weight");
  PI_CHECK(weight.size(0) == input.size(-1), "weight has ", weight.size(0), " elements but input's hidden size is ",
           input.size(-1));
  PI_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

// residual += input; input = rms_norm(residual): both [num_tokens, hidden], residual contiguous.
inline void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual,
                                          const at::Tensor& weight, double eps) {
  check_rms_norm_args(input, input, weight, eps);
  check_same_dtype(residual, input, "residual", "input");
  check_same_device(residual, input, "residual", "input");
  PI_CHECK(residual.sizes() == input.sizes(), "residual must have input's shape ", input.sizes(), ", got ",
           residual.sizes());
  check_contiguous(residual, "residual");
}

// Rows of a tensor seen as [num_rows, hidden] with a row stride (a 2-D view with a contiguous last dim).
inline int64_t row_stride_of(const at::Tensor& t) {
  if (t.dim() < 2 || t.numel() == 0) return t.size(-1);
  // Leading dims must collapse into one: each leading stride = next stride * next size.
  for (int64_t d = 0; d + 2 < t.dim(); ++d) {
    PI_CHECK(t.stride(d) == t.stride(d + 1) * t.size(d + 1), "leading dims must be collapsible, got shape ",
             t.sizes(), " strides ", t.strides());
  }
  return t.stride(-2);
}

struct RotaryShape {
  int64_t num_tokens, num_heads, num_kv_heads, head_size, rot_dim, query_stride, key_stride, max_position;
};

// query [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size]; key likewise with
// num_kv_heads; row strides free, heads packed. positions [num_tokens] int64.
inline RotaryShape check_rotary_args(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                                     int64_t head_size, const at::Tensor& cos_sin_cache) {
  check_dim(positions, 1, "positions");
  check_dtype(positions, at::kLong, "positions");
  check_contiguous(positions, "positions");
  check_float_dtype(query, "query");
  check_same_dtype(key, query, "key", "query");
  check_same_dtype(cos_sin_cache, query, "cos_sin_cache", "query");
  check_dim(cos_sin_cache, 2, "cos_sin_cache");
  check_contiguous(cos_sin_cache, "cos_sin_cache");
  check_same_device(positions, query, "positions", "query");
  check_same_device(key, query, "key", "query");
  check_same_device(cos_sin_cache, query, "cos_sin_cache", "query");
  PI_CHECK(head_size > 0, "head_size must be > 0, got ", head_size);
  for (auto* t : {&query, &key}) {
    PI_CHECK(t->dim() == 2 || t->dim() == 3, "query and key must be [num_tokens, heads * head_size] or "
             "[num_tokens, heads, head_size], got ", t->sizes());
    PI_CHECK((t->stride(-1) == 1 || t->size(-1) <= 1) && (t->dim() == 2 || t->stride(1) == t->size(2)),
             "query and key must have packed heads, got strides ", t->strides());
    PI_CHECK(t->size(0) == positions.size(0), "query/key have ", t->size(0), " tokens but positions has ",
             positions.size(0));
  }
  const int64_t q_width = query.dim() == 3 ? query.size(1) * query.size(2) : query.size(1);
  const int64_t k_width = key.dim() == 3 ? key.size(1) * key.size(2) : key.size(1);
  PI_CHECK(q_width % head_size == 0 && k_width % head_size == 0, "head_size ", head_size,
           " does not divide query width ", q_width, " and key width ", k_width);
  const int64_t rot_dim = cos_sin_cache.size(1);
  PI_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size && rot_dim > 0, "cos_sin_cache's rot_dim ", rot_dim,
           " must be even and in [2, head_size = ", head_size, "]");
  return {positions.size(0), q_width / head_size, k_width / head_size, head_size, rot_dim,
          query.stride(0), key.stride(0), cos_sin_cache.size(0)};
}

// input [..., 2 * d] (last dim contiguous), out [..., d] contiguous.
inline void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& input) {
  check_float_dtype(input, "input");
  check_same_dtype(out, input, "out", "input");
  check_same_device(out, input, "out", "input");
  check_contiguous(out, "out");
  PI_CHECK(input.dim() >= 1 && input.stride(-1) == 1 && input.size(-1) % 2 == 0,
           "input's last dim must be contiguous and even, got shape ", input.sizes(), " strides ", input.strides());
  auto expected = input.sizes().vec();
  expected.back() /= 2;
  PI_CHECK(out.sizes() == at::IntArrayRef(expected), "out must be ", at::IntArrayRef(expected), ", got ", out.sizes());
}

}  // namespace pagedinfer
