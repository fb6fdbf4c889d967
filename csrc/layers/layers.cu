// Norms, rotary embedding and the gated activation on CUDA. Launchers only; the kernels are in
// layer_kernels.cuh and compute what layers_cpu.cpp computes, with the same rounding points.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "core/index_checks.h"
#include "layers/layer_args.h"
#include "layers/layer_kernels.cuh"
#include "ops.h"

// float32, float16, bfloat16 (check_float_dtype's set): AT_DISPATCH_FLOATING_TYPES_AND2 would add double.
#define PI_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                   \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pagedinfer {

namespace {

// The CUDA type with the bits of a torch scalar type: the kernels take no torch headers.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
T* data_as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads of a CTA looping over `work` items: a warp multiple (block_sum needs it), at most max_threads.
int cta_threads(int64_t work, int max_threads) {
  return int(std::min<int64_t>((std::max<int64_t>(work, 1) + 31) / 32 * 32, max_threads));
}

// Calls f(std::integral_constant<int, kWide>) if `wide`, else f(std::integral_constant<int, 1>): the
// vectorized instance of a kernel or its scalar fallback.
template <int kWide, typename F>
void dispatch_width(bool wide, F&& f) {
  if (wide) {
    f(std::integral_constant<int, kWide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

void check_grid_rows(int64_t rows, const char* op) {
  PI_CHECK(rows <= INT_MAX, op, ": ", rows, " rows is too many for one launch (one CTA per row)");
}

// residual: nullptr for rms_norm; for fused_add_rms_norm, out is input (contiguous).
template <bool kFusedAdd>
void launch_rms_norm(at::Tensor& out, const at::Tensor& input, at::Tensor* residual, const at::Tensor& weight,
                     double eps) {
  const int64_t hidden = input.size(-1), rows = input.numel() / hidden, input_stride = row_stride_of(input);
  PI_CHECK(hidden <= INT_MAX, "hidden size ", hidden, " is too large");
  check_grid_rows(rows, "rms_norm");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PI_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool wide = hidden % kVec == 0 && input_stride % kVec == 0 && aligned(input.data_ptr(), 16) &&
                      aligned(out.data_ptr(), 16) && aligned(weight.data_ptr(), 16) &&
                      (residual == nullptr || aligned(residual->data_ptr(), 16));
    dispatch_width<kVec>(wide, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      layers::rms_norm_kernel<T, V, kFusedAdd><<<unsigned(rows), cta_threads(hidden / V, 1024), 0, stream>>>(
          data_as<T>(out), data_as<const T>(input), residual ? data_as<T>(*residual) : nullptr,
          data_as<const T>(weight), input_stride, int(hidden), float(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The CPU version's range check of positions, on a host copy.
void validate_positions(const at::Tensor& positions, int64_t max_position) {
  const at::Tensor host = host_copy(positions);
  const int64_t* pos = host.data_ptr<int64_t>();
  for (int64_t t = 0; t < host.numel(); ++t) {
    PI_CHECK(pos[t] >= 0 && pos[t] < max_position, "positions[", t, "] = ", pos[t], " is out of range [0, ",
             max_position, ") of cos_sin_cache");
  }
}

}  // namespace

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_rms_norm_args(out, input, weight, eps);
  if (input.numel() == 0) return;
  launch_rms_norm<false>(out, input, nullptr, weight, eps);
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(input, residual, weight, eps);
  if (input.numel() == 0) return;
  launch_rms_norm<true>(input, input, &residual, weight, eps);
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_size,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  const RotaryShape s = check_rotary_args(positions, query, key, head_size, cos_sin_cache);
  if (debug_checks_enabled()) validate_positions(positions, s.max_position);
  if (s.num_tokens == 0 || s.num_heads + s.num_kv_heads == 0) return;
  check_grid_rows(s.num_tokens, "rotary_embedding");
  PI_CHECK((s.num_heads + s.num_kv_heads) * s.head_size <= INT_MAX, "rotary_embedding: ", s.num_heads, " + ",
           s.num_kv_heads, " heads of ", s.head_size, " are too many");
  const int64_t half = s.rot_dim / 2;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PI_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    // Widest access 16 bytes: neox moves kPairs elements per half, gptj 2 * kPairs interleaved ones.
    constexpr int kNeoxPairs = 16 / sizeof(T), kGptjPairs = 8 / sizeof(T);
    const int64_t pairs = is_neox ? kNeoxPairs : kGptjPairs;
    const int64_t head_elems = is_neox ? pairs : 2 * pairs;  // elements of one access to a head
    const bool wide = half % pairs == 0 && s.head_size % head_elems == 0 && s.query_stride % head_elems == 0 &&
                      s.key_stride % head_elems == 0 && aligned(query.data_ptr(), head_elems * sizeof(T)) &&
                      aligned(key.data_ptr(), head_elems * sizeof(T)) &&
                      aligned(cos_sin_cache.data_ptr(), pairs * sizeof(T));
    auto launch = [&](auto neox, auto pairs_per_thread) {
      constexpr bool kNeox = decltype(neox)::value;
      constexpr int kPairs = decltype(pairs_per_thread)::value;
      const int64_t groups = (s.num_heads + s.num_kv_heads) * (half / kPairs);
      layers::rotary_embedding_kernel<T, kNeox, kPairs><<<unsigned(s.num_tokens), cta_threads(groups, 512), 0, stream>>>(
          positions.data_ptr<int64_t>(), data_as<T>(query), data_as<T>(key), data_as<const T>(cos_sin_cache),
          s.query_stride, s.key_stride, int(s.num_heads), int(s.num_kv_heads), int(s.head_size), int(s.rot_dim));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (is_neox) {
      dispatch_width<kNeoxPairs>(wide, [&](auto p) { launch(std::true_type{}, p); });
    } else {
      dispatch_width<kGptjPairs>(wide, [&](auto p) { launch(std::false_type{}, p); });
    }
  });
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul_args(out, input);
  if (input.numel() == 0) return;
  const int64_t d = out.size(-1), rows = out.numel() / d, input_stride = row_stride_of(input);
  PI_CHECK(d <= INT_MAX / 2, "silu_and_mul: d = ", d, " is too large");
  check_grid_rows(rows, "silu_and_mul");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PI_DISPATCH_FLOAT_TYPES(input.scalar_type(), "silu_and_mul_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVec = 16 / sizeof(T);
    // d % kVec also aligns the up half (input + d) once the row start is aligned.
    const bool wide = d % kVec == 0 && input_stride % kVec == 0 && aligned(input.data_ptr(), 16) &&
                      aligned(out.data_ptr(), 16);
    dispatch_width<kVec>(wide, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      layers::silu_and_mul_kernel<T, V><<<unsigned(rows), cta_threads(d / V, 1024), 0, stream>>>(
          data_as<T>(out), data_as<const T>(input), input_stride, int(d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pagedinfer
