// Norm, rotary and gated-activation kernels: raw pointers, strides and sizes, no torch headers.
//
// T is float, __half or __nv_bfloat16. Arithmetic is float32 with the CPU versions' (layers_cpu.cpp)
// rounding points: every place the CPU rounds to T, these kernels round to T too (round_to<T>).
// kVec elements per access: 16 bytes' worth where the launcher found addresses, strides and sizes
// aligned to it, 1 otherwise (the scalar fallback); the same kernel serves both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/float_convert.cuh"

namespace pagedinfer::layers {

// ---- conversions (core/float_convert.cuh) and vectors -----------------------------------------------
// x as stored in T, back in float: the rounding point of a CPU expression T(x) used as a float.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// N consecutive elements moved as one access (alignas makes a 16-byte Vec one 128-bit load/store).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load(const T* p) {  // p aligned to sizeof(Vec<T, N>)
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// Sum over the CTA (blockDim.x a multiple of 32), returned to every thread. Call once per kernel: the
// shared partials are not reset.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  // Every warp sums the partials itself, in the same order: all threads get the same value, no second barrier.
  x = lane < int(blockDim.x / 32) ? warp_sums[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ---- RMS norm ------------------------------------------------------------------------------------
// One CTA per row. out = round(round(x * inv_rms) * weight), inv_rms = 1 / sqrt(mean(x^2) + eps) in float32.
// kFusedAdd: first residual = round(input + residual) (in place), and x is that sum; out is then input.
// Pass 2 re-reads the row (from L1/L2) rather than holding it in registers: any hidden size fits.
// out and input may alias (fused: they do): every read of pass 1 is before block_sum's barrier, every
// write of pass 2 after it, and each thread re-reads in pass 2 the residual elements it wrote in pass 1.
template <typename T, int kVec, bool kFusedAdd>
__global__ void rms_norm_kernel(T* out,                         // [num_rows, hidden] contiguous
                                const T* input,                 // [num_rows, hidden], row stride input_stride
                                T* __restrict__ residual,       // [num_rows, hidden] contiguous; kFusedAdd only
                                const T* __restrict__ weight,   // [hidden]
                                int64_t input_stride, int hidden, float eps) {
  const int64_t row = blockIdx.x;
  const T* x = input + row * input_stride;
  T* res = kFusedAdd ? residual + row * hidden : nullptr;
  float sum_sq = 0.f;
  for (int i = threadIdx.x * kVec; i < hidden; i += blockDim.x * kVec) {
    Vec<T, kVec> a = load<T, kVec>(x + i);
    if constexpr (kFusedAdd) {
      const Vec<T, kVec> r = load<T, kVec>(res + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
      store(res + i, a);  // the residual stream keeps the sum rounded to T
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_sq += to_float(a.v[j]) * to_float(a.v[j]);
  }
  const float inv_rms = 1.f / sqrtf(block_sum(sum_sq) / float(hidden) + eps);  // IEEE div/sqrt, as the CPU

  const T* normed = kFusedAdd ? res : x;
  T* y = out + row * hidden;
  for (int i = threadIdx.x * kVec; i < hidden; i += blockDim.x * kVec) {
    const Vec<T, kVec> a = load<T, kVec>(normed + i), w = load<T, kVec>(weight + i);
    Vec<T, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      // As HF's LlamaRMSNorm: normalize in float32, round to T, then scale by the weight.
      o.v[j] = from_float<T>(round_to<T>(to_float(a.v[j]) * inv_rms) * to_float(w.v[j]));
    }
    store(y + i, o);
  }
}

// ---- rotary embedding ----------------------------------------------------------------------------
// One CTA per token, threads over (head, group of kPairs rotation pairs), query heads then key heads.
// Pair i of a head: neox rotates elements (i, i + rot_dim/2), gptj (2i, 2i + 1); both by cos[i], sin[i].
// A thread's kPairs pairs are kPairs consecutive elements of each neox half, or 2 * kPairs consecutive
// elements in gptj: one access each where aligned; kPairs = 1 is the scalar fallback, with no alignment
// beyond the element's. Elements from rot_dim to head_size are left untouched (partial rotary).
template <typename T, bool kNeox, int kPairs>
__global__ void rotary_embedding_kernel(const int64_t* __restrict__ positions,    // [num_tokens]
                                        T* query,                                 // [num_tokens, num_heads * head_size], row stride query_stride
                                        T* key,                                   // [num_tokens, num_kv_heads * head_size], row stride key_stride
                                        const T* __restrict__ cos_sin_cache,      // [max_position, rot_dim]: cos | sin
                                        int64_t query_stride, int64_t key_stride, int num_heads,
                                        int num_kv_heads, int head_size, int rot_dim) {
  const int64_t token = blockIdx.x;
  const int half = rot_dim / 2, groups_per_head = half / kPairs;
  const T* cos = cos_sin_cache + positions[token] * rot_dim;
  const T* sin = cos + half;
  const int query_groups = num_heads * groups_per_head;
  const int all_groups = (num_heads + num_kv_heads) * groups_per_head;
  for (int g = threadIdx.x; g < all_groups; g += blockDim.x) {
    const bool is_query = g < query_groups;
    const int local = is_query ? g : g - query_groups;
    const int head = local / groups_per_head, i0 = (local % groups_per_head) * kPairs;
    T* h = (is_query ? query + token * query_stride : key + token * key_stride) + int64_t(head) * head_size;
    const Vec<T, kPairs> c = load<T, kPairs>(cos + i0), s = load<T, kPairs>(sin + i0);
    Vec<T, kPairs> x, y;  // the first and second element of each pair
    if constexpr (kNeox) {
      x = load<T, kPairs>(h + i0);
      y = load<T, kPairs>(h + half + i0);
    } else if constexpr (kPairs == 1) {  // the scalar fallback: a pair need not be 2-element aligned
      x.v[0] = h[2 * i0];
      y.v[0] = h[2 * i0 + 1];
    } else {
      const Vec<T, 2 * kPairs> xy = load<T, 2 * kPairs>(h + 2 * i0);
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        x.v[j] = xy.v[2 * j];
        y.v[j] = xy.v[2 * j + 1];
      }
    }
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const float xf = to_float(x.v[j]), yf = to_float(y.v[j]), cf = to_float(c.v[j]), sf = to_float(s.v[j]);
      // _rn intrinsics: no fused multiply-add, so each product is rounded as in the CPU version.
      x.v[j] = from_float<T>(__fsub_rn(__fmul_rn(xf, cf), __fmul_rn(yf, sf)));
      y.v[j] = from_float<T>(__fadd_rn(__fmul_rn(yf, cf), __fmul_rn(xf, sf)));
    }
    if constexpr (kNeox) {
      store(h + i0, x);
      store(h + half + i0, y);
    } else if constexpr (kPairs == 1) {
      h[2 * i0] = x.v[0];
      h[2 * i0 + 1] = y.v[0];
    } else {
      Vec<T, 2 * kPairs> xy;
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        xy.v[2 * j] = x.v[j];
        xy.v[2 * j + 1] = y.v[j];
      }
      store(h + 2 * i0, xy);
    }
  }
}

// ---- SiLU and mul --------------------------------------------------------------------------------
// exp for silu in T. For float outputs, rounded as the host's expf rounds (glibc's is correctly rounded in
// practice): CUDA's expf is off by up to 2 ulp, which float32 outputs show, so exp in double, rounded once
// (hidden under this memory-bound kernel's loads). 16-bit outputs round that difference away: expf.
template <typename T>
__device__ __forceinline__ float silu_exp(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return float(exp(double(x)));
  } else {
    return expf(x);
  }
}

// One CTA per row: out[i] = round(round(silu(gate[i])) * up[i]), gate = input[:d], up = input[d:].
template <typename T, int kVec>
__global__ void silu_and_mul_kernel(T* __restrict__ out,          // [num_rows, d] contiguous
                                    const T* __restrict__ input,  // [num_rows, 2 * d], row stride input_stride
                                    int64_t input_stride, int d) {
  const int64_t row = blockIdx.x;
  const T* gate = input + row * input_stride;
  const T* up = gate + d;
  T* y = out + row * d;
  for (int i = threadIdx.x * kVec; i < d; i += blockDim.x * kVec) {
    const Vec<T, kVec> g = load<T, kVec>(gate + i), u = load<T, kVec>(up + i);
    Vec<T, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float gf = to_float(g.v[j]);
      // As HF: silu(gate) rounded to T, then multiplied by up; IEEE division, not the fast form.
      o.v[j] = from_float<T>(round_to<T>(gf / (1.f + silu_exp<T>(-gf))) * to_float(u.v[j]));
    }
    store(y + i, o);
  }
}

}  // namespace pagedinfer::layers
