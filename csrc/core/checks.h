// Argument checks shared by the CPU and CUDA launchers: every failure names the argument and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define PI_CHECK(cond, ...) TORCH_CHECK(cond, "pagedinfer: ", __VA_ARGS__)

namespace pagedinfer {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  PI_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  PI_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  PI_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
           ref_name, " has ", ref.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  PI_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
           ref.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  PI_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ",
           t.strides(), ")");
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  auto d = t.scalar_type();
  PI_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
           " must be float32, float16 or bfloat16, got ", d);
}

// KV cache layout [2, num_blocks, block_size, num_kv_heads, head_size], contiguous.
inline void check_kv_cache(const at::Tensor& kv_cache, const char* name) {
  check_dim(kv_cache, 5, name);
  PI_CHECK(kv_cache.size(0) == 2, name, " must be [2, num_blocks, block_size, num_kv_heads, head_size], got ",
           kv_cache.sizes());
  check_contiguous(kv_cache, name);
  check_float_dtype(kv_cache, name);
}

}  // namespace pagedinfer
