// Paged attention on tensor cores (fp16/bf16, head_size 64 or 128): one CTA per (query row, kv head,
// head tile of up to 16 query heads, split of the keys). The query heads of one kv head (the GQA group)
// are the M = 16 rows of mma.sync m16n8k16, so each K/V row is read from memory once for the whole group.
//
// Per CTA: 4 warps. The split's keys are cut into tiles of 16; warp w takes tiles w, w + 4, ... and runs
// its own online softmax over them, so the main loop needs no CTA-wide barrier: each warp streams its
// tiles through its own 3-stage cp.async ring in shared memory. Per tile:
//   S[16 heads x 16 keys] = Q·K^T     (Q fragments live in registers for the whole CTA; K by ldmatrix)
//   online softmax on S in registers  (the C fragment of S is re-packed as the A fragment of P)
//   O[16 heads x D] += P·V            (V by ldmatrix.trans)
// At the end the 4 warps' (max, sum, O) are merged through shared memory; the CTA then writes `out`
// (one split) or its normalized partial and log-sum-exp (split-KV, merged by split_kv_reduce_kernel).
// Decode (one row per sequence) and the general path (one row per query token) share this kernel.
#pragma once

#include <cstdint>

#include "attention/attention_params.cuh"
#include "attention/ptx.cuh"

namespace pagedinfer::attention {

template <typename T, int kHeadSize>
struct MmaAttentionConfig {
  static_assert(kHeadSize == 64 || kHeadSize == 128, "the tensor-core path is specialized for 64 and 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 3;       // tiles in a warp's ring: 2 in flight while it computes 1
  static constexpr int kTileKeys = 16;    // keys per tile: the N of S = Q·K^T and the K of P·V
  static constexpr int kRows = 16;        // query heads per CTA: the M of both products
  static constexpr int kChunks = kHeadSize / 8;                   // 16-byte chunks per K/V row
  static constexpr int kLoadPasses = kTileKeys * kChunks / 32;    // cp.async of 16 B per lane per pass
  static constexpr int kTileElems = kTileKeys * kHeadSize;
  static constexpr int kStageElems = 2 * kTileElems;              // K tile, then V tile
  static constexpr int kRingBytes = kWarps * kStages * kStageElems * int(sizeof(T));
  // Merge of the warps' partial results, aliased onto the rings once every warp is done with them.
  // Rows padded by 8 floats: the float2 stores of a fragment then spread over all banks.
  static constexpr int kMergeStride = kHeadSize + 8;
  static constexpr int kMergeBytes = (kWarps * kRows * kMergeStride + 2 * kWarps * kRows) * 4;
  static constexpr int kSmemBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
};

// Shared-memory position (in elements) of 16-byte chunk `chunk` of row `row` of a K or V tile. The chunk
// index is XOR-ed with row % 8 so that the 8 rows one ldmatrix reads (256 or 128 bytes apart, the same
// banks) land in 8 different bank groups: conflict-free ldmatrix without padding. Needs >= 8 chunks a row.
template <int kHeadSize>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadSize + ((chunk ^ (row & 7)) << 3);
}

// kBlockSize: 16 or 32 (compile time, a tile of 16 keys then lies in one block: one table lookup per
// tile), or 0 (any block size, read from params; one lookup per row).
template <typename T, int kHeadSize, int kBlockSize>
__global__ void __launch_bounds__(MmaAttentionConfig<T, kHeadSize>::kThreads)
    mma_paged_attention_kernel(const PagedAttentionParams p) {
  using Cfg = MmaAttentionConfig<T, kHeadSize>;
  constexpr int kKSteps = kHeadSize / 16;   // k-steps of Q·K^T
  constexpr int kOutTiles = kHeadSize / 8;  // n-tiles of P·V
  static_assert(kBlockSize == 0 || kBlockSize % Cfg::kTileKeys == 0, "tiles must not straddle blocks");

  extern __shared__ __align__(16) unsigned char smem[];
  // The split-KV merge may begin launching now: it waits for this grid's results itself, and it only
  // starts once every CTA of this grid has started, so it never takes a slot from this grid.
  allow_dependent_launch();

  // ---- which work this CTA does ------------------------------------------------------------------------
  const int group = p.num_heads / p.num_kv_heads;
  const CtaWork work = cta_work(p, Cfg::kRows);
  const int item = work.item, kv_head = work.kv_head, head_tile = work.head_tile, split = work.split;

  const QueryRow row = locate_query_row(p, item);
  if (row.token < 0) return;  // uniform over the CTA

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // fragment coordinates: row group and thread-in-group
  const int head0 = kv_head * group + head_tile * Cfg::kRows;  // first query head of this CTA
  const int rows = group - head_tile * Cfg::kRows < Cfg::kRows ? group - head_tile * Cfg::kRows : Cfg::kRows;

  // ---- Q as A fragments, in registers for the whole CTA (rows >= `rows` are zero padding) -----------------
  uint32_t q_frag[kKSteps][4];
  {
    const uint16_t* q_base = static_cast<const uint16_t*>(p.query) + int64_t(row.token) * p.q_row_stride;
    load_a_fragments(q_frag, q_base + int64_t(head0 + g) * kHeadSize, g < rows,  // head rows g, g + 8
                     q_base + int64_t(head0 + g + 8) * kHeadSize, g + 8 < rows, t);
  }

  // ---- this split's tiles, and this warp's share of them ---------------------------------------------------
  const int tile_first = row.key_begin / Cfg::kTileKeys;
  const int tile_last = row.key_end > row.key_begin ? (row.key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys
                                                    : tile_first;
  int tile_begin, tile_end;
  split_tile_range(tile_first, tile_last, p.num_splits, split, Cfg::kWarps, tile_begin, tile_end);
  const int my_first_tile = tile_begin + warp;
  const int my_tiles = my_first_tile < tile_end ? (tile_end - my_first_tile + Cfg::kWarps - 1) / Cfg::kWarps : 0;

  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_tables + int64_t(row.seq) * p.max_blocks_per_seq;
  const int64_t token_stride = int64_t(p.num_kv_heads) * kHeadSize;
  const int64_t head_offset = int64_t(kv_head) * kHeadSize;
  T* ring = reinterpret_cast<T*>(smem) + warp * Cfg::kStages * Cfg::kStageElems;

  // Issues the cp.async of K and V rows of `tile` into ring slot `stage`: lane l copies chunks l, l + 32, ...
  // (2 rows of 256 B per pass for head 128: each half-warp reads one contiguous row).
  auto load_tile = [&](int tile, int stage) {
    T* k_dst = ring + stage * Cfg::kStageElems;
    T* v_dst = k_dst + Cfg::kTileElems;
    const int key0 = tile * Cfg::kTileKeys;
    int64_t tile_slot = 0;  // cache slot of key0 when the tile lies inside one block
    if constexpr (kBlockSize > 0) {
      tile_slot = int64_t(block_table[key0 / kBlockSize]) * kBlockSize + key0 % kBlockSize;
    }
#pragma unroll
    for (int pass = 0; pass < Cfg::kLoadPasses; ++pass) {
      const int c = lane + 32 * pass;
      const int r = c / Cfg::kChunks, chunk = c % Cfg::kChunks;
      const int key = key0 + r;
      const bool valid = key >= row.key_begin && key < row.key_end;
      int64_t src = 0;
      if (valid) {
        if constexpr (kBlockSize > 0) {
          src = (tile_slot + r) * token_stride + head_offset;
        } else {
          src = kv_row_offset(block_table, key, p.block_size, token_stride, head_offset);
        }
        src += chunk * 8;
      }
      const int dst = swizzled<kHeadSize>(r, chunk);
      cp_async_16(k_dst + dst, kv + src, valid);
      cp_async_16(v_dst + dst, kv + p.v_offset + src, valid);
    }
  };

  float o_acc[kOutTiles][4];  // O fragment: n-tile j holds head dims 8j .. 8j+7
#pragma unroll
  for (int j = 0; j < kOutTiles; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max (base-2 units) of head rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the running sums (quad-reduced at the end)

  // Consumes ring slot `stage` holding `tile`.
  auto compute_tile = [&](int tile, int stage) {
    const T* k_tile = ring + stage * Cfg::kStageElems;
    const T* v_tile = k_tile + Cfg::kTileElems;

    // S = Q·K^T: K rows are the B operand "column-major" as stored ([key][dim]), so plain ldmatrix gives
    // B fragments. Matrices: (keys 0-7, chunk 2ks), (keys 0-7, chunk 2ks+1), (keys 8-15, ...), (keys 8-15, ...).
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const int k_row = (lane / 16) * 8 + lane % 8;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t kb[4];
      ldmatrix_x4(kb, k_tile + swizzled<kHeadSize>(k_row, 2 * ks + (lane / 8) % 2));
      mma_m16n8k16<T>(s[0], q_frag[ks], kb[0], kb[1]);
      mma_m16n8k16<T>(s[1], q_frag[ks], kb[2], kb[3]);
    }

    // Scale into base-2 units and mask keys the row may not see (outside [key_begin, key_end)).
    const int key0 = tile * Cfg::kTileKeys;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + 8 * n + 2 * t + (e & 1);
        const bool visible = key >= row.key_begin && key < row.key_end;
        s[n][e] = visible ? s[n][e] * p.scale_log2 : -INFINITY;
      }
    }

    // Online softmax. Thread holds columns 2t, 2t+1 (+8) of rows g (e = 0, 1) and g + 8 (e = 2, 3); the
    // row's 4 threads (a quad) exchange their maxima by shuffles.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[h], tile_max);
      // A row with no visible key yet keeps max -inf; subtracting 0 then keeps every exp2 at 0, not NaN.
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      const float rescale = fast_exp2(row_max[h] - ref);
      row_max[h] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        s[n][2 * h] = fast_exp2(s[n][2 * h] - ref);
        s[n][2 * h + 1] = fast_exp2(s[n][2 * h + 1] - ref);
        sum += s[n][2 * h] + s[n][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
      for (int j = 0; j < kOutTiles; ++j) {
        o_acc[j][2 * h] *= rescale;
        o_acc[j][2 * h + 1] *= rescale;
      }
    }

    // P as the A fragment: the C fragment of S (row g / g+8, keys 2t, 2t+1 of each 8-key n-tile) is
    // exactly the A layout of m16n8k16 with the 16 keys as K, so P never leaves registers.
    const uint32_t p_frag[4] = {pack_pair<T>(s[0][0], s[0][1]), pack_pair<T>(s[0][2], s[0][3]),
                                pack_pair<T>(s[1][0], s[1][1]), pack_pair<T>(s[1][2], s[1][3])};

    // O += P·V: V is [key][dim], the B operand wants (key pairs of one dim) per lane: ldmatrix.trans.
    // Matrices: (keys 0-7, chunk 2j), (keys 8-15, chunk 2j), (keys 0-7, chunk 2j+1), (keys 8-15, chunk 2j+1).
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int j = 0; j < kOutTiles; j += 2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_tile + swizzled<kHeadSize>(v_row, j + lane / 16));
      mma_m16n8k16<T>(o_acc[j], p_frag, vb[0], vb[1]);
      mma_m16n8k16<T>(o_acc[j + 1], p_frag, vb[2], vb[3]);
    }
  };

  // ---- main loop: per-warp cp.async ring, no CTA barrier ----------------------------------------------------
  // One commit per step, empty or not, keeps "group i = tile i" so wait_group<kStages - 2> means "tile i landed".
#pragma unroll
  for (int st = 0; st < Cfg::kStages - 1; ++st) {
    if (st < my_tiles) load_tile(my_first_tile + st * Cfg::kWarps, st);
    cp_async_commit();
  }
  int stage = 0;
  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<Cfg::kStages - 2>();
    // Makes every lane's copies of tile i visible to the warp, and orders everyone's reads of the slot
    // refilled below (it held tile i - 1) before the new copies.
    __syncwarp();
    const int ahead = i + Cfg::kStages - 1;
    const int ahead_stage = stage == 0 ? Cfg::kStages - 1 : stage - 1;
    if (ahead < my_tiles) load_tile(my_first_tile + ahead * Cfg::kWarps, ahead_stage);
    cp_async_commit();
    compute_tile(my_first_tile + i * Cfg::kWarps, stage);
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();

  // ---- merge the 4 warps' partial softmax states --------------------------------------------------------
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  __syncthreads();  // every warp is done with its ring: the merge buffers alias it
  float* merge_out = reinterpret_cast<float*>(smem);                         // [warps][16][kMergeStride]
  float* merge_max = merge_out + Cfg::kWarps * Cfg::kRows * Cfg::kMergeStride;  // [warps][16]
  float* merge_sum = merge_max + Cfg::kWarps * Cfg::kRows;                     // [warps][16]
  {
    float* mine = merge_out + warp * Cfg::kRows * Cfg::kMergeStride;
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) {
      *reinterpret_cast<float2*>(mine + g * Cfg::kMergeStride + 8 * j + 2 * t) = make_float2(o_acc[j][0], o_acc[j][1]);
      *reinterpret_cast<float2*>(mine + (g + 8) * Cfg::kMergeStride + 8 * j + 2 * t) =
          make_float2(o_acc[j][2], o_acc[j][3]);
    }
    if (t == 0) {
      merge_max[warp * Cfg::kRows + g] = row_max[0];
      merge_max[warp * Cfg::kRows + g + 8] = row_max[1];
      merge_sum[warp * Cfg::kRows + g] = row_sum[0];
      merge_sum[warp * Cfg::kRows + g + 8] = row_sum[1];
    }
  }
  __syncthreads();

  // Each thread finishes 4 consecutive dims of one head row.
  constexpr int kQuads = kHeadSize / 4;
  for (int idx = threadIdx.x; idx < rows * kQuads; idx += Cfg::kThreads) {
    const int r = idx / kQuads, d = (idx % kQuads) * 4;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) m = fmaxf(m, merge_max[w * Cfg::kRows + r]);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float total = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < Cfg::kWarps; ++w) {
        const float f = fast_exp2(merge_max[w * Cfg::kRows + r] - m);
        total += f * merge_sum[w * Cfg::kRows + r];
        const float4 o = *reinterpret_cast<const float4*>(merge_out + (w * Cfg::kRows + r) * Cfg::kMergeStride + d);
        acc.x += f * o.x;
        acc.y += f * o.y;
        acc.z += f * o.z;
        acc.w += f * o.w;
      }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;  // no visible key: zeros
    const int head = head0 + r;
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + (int64_t(row.token) * p.num_heads + head) * kHeadSize + d;
      o[0] = from_float<T>(acc.x * inv);
      o[1] = from_float<T>(acc.y * inv);
      o[2] = from_float<T>(acc.z * inv);
      o[3] = from_float<T>(acc.w * inv);
    } else {
      const int64_t part = (int64_t(row.seq) * p.num_heads + head) * p.num_splits + split;  // as the merge reads
      float* o = p.partial_out + part * kHeadSize + d;
      o[0] = acc.x * inv;
      o[1] = acc.y * inv;
      o[2] = acc.z * inv;
      o[3] = acc.w * inv;
      if (d == 0) p.partial_lse[part] = total > 0.f ? m + __log2f(total) : -INFINITY;
    }
  }
}

}  // namespace pagedinfer::attention
