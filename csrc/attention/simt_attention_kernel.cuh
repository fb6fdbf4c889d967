// Paged attention on CUDA cores, for every case the tensor-core kernel does not take: float32, any
// head_size <= 256, any block size, unaligned caches. Same contract and grid as mma_attention_kernel.cuh:
// one CTA per (query row, kv head, tile of up to 8 query heads of its group, split of the keys).
//
// 4 warps; keys in tiles of 32, staged in shared memory as float32:
//   scores: warp w owns heads w and w + 4; lane = key; online softmax per head across the warp
//   P·V:    thread owns (head, dim) outputs tid, tid + 128, ... (at most 8 * 256 / 128 = 16 accumulators)
// Correct and simple rather than fast: the hot configurations run on tensor cores.
#pragma once

#include <cstdint>

#include "attention/attention_params.cuh"
#include "attention/ptx.cuh"

namespace pagedinfer::attention {

struct SimtAttentionConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kHeads = 8;      // query heads per CTA
  static constexpr int kTileKeys = 32;  // one key per lane when scoring
  static constexpr int kMaxHeadSize = 256;
  static constexpr int kMaxOutputs = kHeads * kMaxHeadSize / kThreads;  // accumulators per thread

  // K rows get an odd stride: lane = key reads k[lane][d], conflict-free across the 32 banks.
  static __host__ __device__ int k_stride(int head_size) { return head_size | 1; }

  // Dynamic shared memory: key row offsets (int64), then q, k, v, p, rescale, max, sum (float32).
  static __host__ __device__ int smem_bytes(int head_size) {
    return kTileKeys * 8 +
           4 * (kHeads * head_size + kTileKeys * k_stride(head_size) + kTileKeys * head_size +
                kHeads * kTileKeys + 3 * kHeads);
  }
};

template <typename T>
__global__ void __launch_bounds__(SimtAttentionConfig::kThreads)
    simt_paged_attention_kernel(const PagedAttentionParams p) {
  using Cfg = SimtAttentionConfig;
  extern __shared__ __align__(16) unsigned char smem[];
  // The split-KV merge may begin launching now: it waits for this grid's results itself, and it only
  // starts once every CTA of this grid has started, so it never takes a slot from this grid.
  allow_dependent_launch();

  const int group = p.num_heads / p.num_kv_heads;
  const CtaWork work = cta_work(p, Cfg::kHeads);
  const int item = work.item, kv_head = work.kv_head, head_tile = work.head_tile, split = work.split;

  const QueryRow row = locate_query_row(p, item);
  if (row.token < 0) return;  // uniform over the CTA

  const int D = p.head_size;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int head0 = kv_head * group + head_tile * Cfg::kHeads;
  const int heads = group - head_tile * Cfg::kHeads < Cfg::kHeads ? group - head_tile * Cfg::kHeads : Cfg::kHeads;
  const int k_stride = Cfg::k_stride(D);

  int64_t* key_offset = reinterpret_cast<int64_t*>(smem);  // [32]: K row offset of each key, -1 if not visible
  float* q_s = reinterpret_cast<float*>(key_offset + Cfg::kTileKeys);  // [kHeads][D], pre-scaled
  float* k_s = q_s + Cfg::kHeads * D;                                  // [32][k_stride]
  float* v_s = k_s + Cfg::kTileKeys * k_stride;                        // [32][D]
  float* p_s = v_s + Cfg::kTileKeys * D;                               // [kHeads][32]
  float* rescale_s = p_s + Cfg::kHeads * Cfg::kTileKeys;               // [kHeads]
  float* max_s = rescale_s + Cfg::kHeads;                              // [kHeads]
  float* sum_s = max_s + Cfg::kHeads;                                  // [kHeads]

  const T* query = static_cast<const T*>(p.query) + int64_t(row.token) * p.q_row_stride + int64_t(head0) * D;
  for (int i = threadIdx.x; i < Cfg::kHeads * D; i += Cfg::kThreads) {
    q_s[i] = i < heads * D ? to_float(query[i]) * p.scale_log2 : 0.f;
  }

  // The (head, dim) outputs this thread accumulates.
  int out_head[Cfg::kMaxOutputs], out_dim[Cfg::kMaxOutputs];
  float acc[Cfg::kMaxOutputs];
#pragma unroll
  for (int i = 0; i < Cfg::kMaxOutputs; ++i) {
    const int e = threadIdx.x + i * Cfg::kThreads;
    out_head[i] = e < heads * D ? e / D : -1;
    out_dim[i] = e < heads * D ? e % D : 0;
    acc[i] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // heads warp and warp + 4, same in every lane
  float row_sum[2] = {0.f, 0.f};

  const int tile_first = row.key_begin / Cfg::kTileKeys;
  const int tile_last = row.key_end > row.key_begin ? (row.key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys
                                                    : tile_first;
  int tile_begin, tile_end;
  split_tile_range(tile_first, tile_last, p.num_splits, split, 1, tile_begin, tile_end);

  const T* k_cache = static_cast<const T*>(p.kv_cache);
  const T* v_cache = k_cache + p.v_offset;
  const int32_t* block_table = p.block_tables + int64_t(row.seq) * p.max_blocks_per_seq;
  const int64_t token_stride = int64_t(p.num_kv_heads) * D;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int key0 = tile * Cfg::kTileKeys;
    __syncthreads();  // the previous tile's k_s, v_s, p_s, key_offset are consumed
    if (threadIdx.x < Cfg::kTileKeys) {
      const int key = key0 + threadIdx.x;
      const bool visible = key >= row.key_begin && key < row.key_end;
      key_offset[threadIdx.x] =
          visible ? kv_row_offset(block_table, key, p.block_size, token_stride, int64_t(kv_head) * D) : -1;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < Cfg::kTileKeys * D; i += Cfg::kThreads) {
      const int r = i / D, d = i - r * D;
      const int64_t off = key_offset[r];
      // Invisible rows become zeros: stale cache contents may be NaN, and NaN * 0 is NaN.
      k_s[r * k_stride + d] = off >= 0 ? to_float(k_cache[off + d]) : 0.f;
      v_s[r * D + d] = off >= 0 ? to_float(v_cache[off + d]) : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int h = warp + j * Cfg::kWarps;
      if (h >= heads) continue;  // warp-uniform
      const float* qh = q_s + h * D;
      const float* kr = k_s + lane * k_stride;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(qh[d], kr[d], s);
      const int key = key0 + lane;
      s = key >= row.key_begin && key < row.key_end ? s : -INFINITY;
      const float new_max = fmaxf(row_max[j], warp_max(s));
      const float ref = new_max == -INFINITY ? 0.f : new_max;  // no visible key yet: keep exp2 at 0, not NaN
      const float rescale = fast_exp2(row_max[j] - ref);
      const float pr = fast_exp2(s - ref);
      row_max[j] = new_max;
      row_sum[j] = row_sum[j] * rescale + warp_sum(pr);
      p_s[h * Cfg::kTileKeys + lane] = pr;
      if (lane == 0) rescale_s[h] = rescale;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < Cfg::kMaxOutputs; ++i) {
      const int h = out_head[i];
      if (h < 0) continue;
      const float* ph = p_s + h * Cfg::kTileKeys;
      const float* vd = v_s + out_dim[i];
      float sum = 0.f;
#pragma unroll 8
      for (int k = 0; k < Cfg::kTileKeys; ++k) sum = fmaf(ph[k], vd[k * D], sum);
      acc[i] = acc[i] * rescale_s[h] + sum;
    }
  }

#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int h = warp + j * Cfg::kWarps;
    if (h < heads && lane == 0) {
      max_s[h] = row_max[j];
      sum_s[h] = row_sum[j];
    }
  }
  __syncthreads();

#pragma unroll
  for (int i = 0; i < Cfg::kMaxOutputs; ++i) {
    const int h = out_head[i];
    if (h < 0) continue;
    const float total = sum_s[h];
    const float value = total > 0.f ? acc[i] / total : 0.f;  // no visible key: zeros
    const int d = out_dim[i];
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(int64_t(row.token) * p.num_heads + head0 + h) * D + d] = from_float<T>(value);
    } else {
      const int64_t part = (int64_t(row.seq) * p.num_heads + head0 + h) * p.num_splits + split;  // as the merge reads
      p.partial_out[part * D + d] = value;
      if (d == 0) p.partial_lse[part] = total > 0.f ? max_s[h] + __log2f(total) : -INFINITY;
    }
  }
}

}  // namespace pagedinfer::attention
