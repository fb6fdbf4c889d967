// Second pass of split-KV (flash-decoding): merges the num_splits partial results of each (sequence,
// query head) into `out`. Partial s holds the split's normalized output O_s and its base-2 log-sum-exp
// L_s (-inf for a split that saw no key); the result is sum_s 2^(L_s - L) O_s / sum_s 2^(L_s - L) with
// L = max_s L_s. All splits empty (padded row, or no visible key) gives zeros.
//
// One CTA per (sequence, head). Warp w merges splits w, w + 4, ... (lane = dims lane, lane + 32, ...)
// with a running max, kUnroll splits per step whose loads are all issued before any is used; then the 4
// warps' (max, weight sum, output) are merged through shared memory. A single long sequence has many
// splits and few (sequence, head) pairs, so this pass is latency-bound: it keeps loads in flight and
// runs no dependent load chain.
#pragma once

#include <cstdint>

#include "attention/attention_params.cuh"
#include "attention/ptx.cuh"

namespace pagedinfer::attention {

struct SplitKvReduceConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kUnroll = 4;  // splits in flight per warp
  static constexpr int kMaxHeadSize = 256;
  static constexpr int kMaxDimsPerLane = kMaxHeadSize / 32;
};

template <typename T>
__global__ void __launch_bounds__(SplitKvReduceConfig::kThreads)
    split_kv_reduce_kernel(const PagedAttentionParams p) {
  using Cfg = SplitKvReduceConfig;
  __shared__ float warp_max_s[Cfg::kWarps];
  __shared__ float warp_sum_s[Cfg::kWarps];
  __shared__ float warp_out_s[Cfg::kWarps][Cfg::kMaxHeadSize];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t pair = blockIdx.x;  // (seq, head)
  const int seq = int(pair / p.num_heads), head = int(pair % p.num_heads);
  // Not written by the split kernel: safe to read before the wait.
  const int token = p.query_start_loc[seq];
  const bool has_row = p.query_start_loc[seq + 1] - token == 1;  // else the split kernel wrote nothing
  const int S = p.num_splits, D = p.head_size;
  const float* lse = p.partial_lse + pair * S;
  const float* part = p.partial_out + pair * S * D;

  // Launched as a programmatic dependent of the split kernel: wait until its partials are visible.
  wait_for_prerequisite_grids();

  float run_max = -INFINITY, run_sum = 0.f;
  float acc[Cfg::kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < Cfg::kMaxDimsPerLane; ++i) acc[i] = 0.f;

  for (int s0 = warp; s0 < S; s0 += Cfg::kWarps * Cfg::kUnroll) {
    float l[Cfg::kUnroll], v[Cfg::kUnroll][Cfg::kMaxDimsPerLane];
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      const int s = s0 + u * Cfg::kWarps;
      l[u] = s < S ? lse[s] : -INFINITY;
#pragma unroll
      for (int i = 0; i < Cfg::kMaxDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        // Every split of a row with a query token was written (empty ones as zeros), so these are finite.
        v[u][i] = s < S && d < D ? part[int64_t(s) * D + d] : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      if (l[u] == -INFINITY) continue;  // empty split (or past the end); warp-uniform
      const float new_max = fmaxf(run_max, l[u]);
      const float rescale = fast_exp2(run_max - new_max);  // 0 while run_max is -inf
      const float w = fast_exp2(l[u] - new_max);
      run_max = new_max;
      run_sum = run_sum * rescale + w;
#pragma unroll
      for (int i = 0; i < Cfg::kMaxDimsPerLane; ++i) acc[i] = acc[i] * rescale + w * v[u][i];
    }
  }

  if (lane == 0) {
    warp_max_s[warp] = run_max;
    warp_sum_s[warp] = run_sum;
  }
#pragma unroll
  for (int i = 0; i < Cfg::kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) warp_out_s[warp][d] = acc[i];
  }
  __syncthreads();
  if (!has_row) return;

  float top = -INFINITY;
#pragma unroll
  for (int w = 0; w < Cfg::kWarps; ++w) top = fmaxf(top, warp_max_s[w]);
  float scale[Cfg::kWarps];
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < Cfg::kWarps; ++w) {
    scale[w] = top == -INFINITY ? 0.f : fast_exp2(warp_max_s[w] - top);  // all empty: zeros, not NaN
    total += scale[w] * warp_sum_s[w];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + (int64_t(token) * p.num_heads + head) * D;
  for (int d = threadIdx.x; d < D; d += Cfg::kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) sum += scale[w] * warp_out_s[w][d];
    out[d] = from_float<T>(sum * inv);
  }
}

}  // namespace pagedinfer::attention
