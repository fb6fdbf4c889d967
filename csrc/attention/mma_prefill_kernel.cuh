// Paged attention for prompt chunks on tensor cores (fp16/bf16, head_size 64 or 128), FlashAttention-2
// style: one CTA per (sequence, kv head, tile of 128 query rows), where the rows are the sequence's
// (new token, query head of the kv head's group) pairs, token-major. Packing the GQA group into the M rows
// lets every K/V tile, read once from the paged cache into shared memory, serve all heads of the group
// and 128 / group tokens at once (Llama-3 8B: 32 tokens x 4 heads).
//
// Per CTA: 8 warps, warp w owns rows 16w .. 16w+15 (the M = 16 of mma.sync m16n8k16). Keys stream in tiles
// of 64 through a 3-stage cp.async ring shared by all warps (one __syncthreads per tile). Per tile and warp:
//   S[16 rows x 64 keys] = Q·K^T      (Q fragments in registers for the whole CTA; K by ldmatrix)
//   causal / window mask, only on tiles that cut through some row's visible range
//   online softmax in registers       (the C fragment of S is re-packed as the A fragment of P)
//   O[16 rows x D] += P·V             (V by ldmatrix.trans)
// Tiles no row of the CTA can see (after the diagonal, before every row's window) are never loaded; tiles
// no row of one warp can see are skipped by that warp. Each warp normalizes and writes its own rows.
//
// Rows past the sequence's q_len * group (the last tile of a sequence, and every tile of a short sequence
// in a grid sized by max_query_len) do no work; CTAs with no such row exit at once.
#pragma once

#include <cstdint>

#include "attention/attention_params.cuh"
#include "attention/mma_attention_kernel.cuh"  // swizzled(): the conflict-free K/V tile layout
#include "attention/ptx.cuh"

namespace pagedinfer::attention {

template <typename T, int kHeadSize>
struct MmaPrefillConfig {
  static_assert(kHeadSize == 64 || kHeadSize == 128, "the tensor-core path is specialized for 64 and 128");
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = 16;                 // the M of mma.sync
  // 128 rows per CTA: each K/V byte brought into shared memory feeds 128 rows of math. With 64 rows the
  // L2 -> SM traffic of a long causal prefill would approach the L2 bandwidth at the target FLOP rate.
  static constexpr int kRows = kWarps * kWarpRows;
  static constexpr int kTileKeys = 64;                 // keys per tile: the N of Q·K^T, the K of P·V
  static constexpr int kStages = 3;                    // 2 tiles in flight while the warps compute 1
  static constexpr int kChunks = kHeadSize / 8;        // 16-byte chunks per K/V row
  static constexpr int kLoadPasses = kTileKeys * kChunks / kThreads;
  static_assert(kTileKeys * kChunks % kThreads == 0, "every thread copies the same number of chunks");
  static constexpr int kTileElems = kTileKeys * kHeadSize;
  static constexpr int kStageElems = 2 * kTileElems;   // K tile, then V tile
  static constexpr int kSmemBytes = kStages * kStageElems * int(sizeof(T));  // 96 KB (head 128), 48 KB (64)
  // Head 128 needs ~230 registers a thread (Q, O and S fragments): one CTA per SM. Head 64 fits in 128, so
  // two CTAs share an SM and one's barrier waits and epilogue hide behind the other's math.
  static constexpr int kMinCtasPerSm = kHeadSize == 64 ? 2 : 1;
};

// Number of row tiles a sequence of q_len new tokens needs (host and device agree on it).
__host__ __device__ constexpr int64_t prefill_row_tiles(int64_t q_len, int64_t group, int64_t rows_per_cta) {
  return (q_len * group + rows_per_cta - 1) / rows_per_cta;
}

// kBlockSize: 16 or 32 (compile time: the block of a key is a shift away), or 0 (any block size).
// row_tiles: prefill_row_tiles(max_query_len, group, kRows), from host ints only (CUDA-graph safe).
template <typename T, int kHeadSize, int kBlockSize>
__global__ void __launch_bounds__(MmaPrefillConfig<T, kHeadSize>::kThreads, MmaPrefillConfig<T, kHeadSize>::kMinCtasPerSm)
    mma_prefill_attention_kernel(const PagedAttentionParams p, const int row_tiles) {
  using Cfg = MmaPrefillConfig<T, kHeadSize>;
  constexpr int kKSteps = kHeadSize / 16;             // k-steps of Q·K^T
  constexpr int kOutTiles = kHeadSize / 8;            // n-tiles of P·V
  constexpr int kKeyTiles = Cfg::kTileKeys / 8;       // n-tiles of S
  constexpr int kPSteps = Cfg::kTileKeys / 16;        // k-steps of P·V

  extern __shared__ __align__(16) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);

  // ---- which rows this CTA serves -------------------------------------------------------------------------
  // Row tiles fastest and in reverse: the CTAs of one (sequence, kv head) run side by side (their K/V stays
  // in L2), and the last row tiles, which see the most keys under the causal mask, start first.
  int b = blockIdx.x;
  const int row_tile = row_tiles - 1 - b % row_tiles;
  b /= row_tiles;
  const int kv_head = b % p.num_kv_heads;
  const int seq = b / p.num_kv_heads;

  const int group = p.num_heads / p.num_kv_heads;
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int seq_len = p.seq_lens[seq];
  const int seq_rows = q_len * group;
  const int row0 = row_tile * Cfg::kRows;  // first row of this CTA among the sequence's seq_rows
  if (row0 >= seq_rows) return;            // uniform: nothing of this sequence here
  const int cta_rows = seq_rows - row0 < Cfg::kRows ? seq_rows - row0 : Cfg::kRows;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // fragment coordinates: row group and thread-in-group
  // (token, head) of flat row r of this CTA: query row / out row index and its query head.
  auto out_offset = [&](int r) -> int64_t {
    const int fr = row0 + r;
    return (int64_t(q_start + fr / group) * p.num_heads + kv_head * group + fr % group) * kHeadSize;
  };

  if (seq_len <= 0) {  // padded row: zeros, 16 bytes per store
    constexpr int kVecs = kHeadSize / 8;
    for (int i = threadIdx.x; i < cta_rows * kVecs; i += Cfg::kThreads) {
      T* o = static_cast<T*>(p.out) + out_offset(i / kVecs) + (i % kVecs) * 8;
      *reinterpret_cast<uint4*>(o) = make_uint4(0u, 0u, 0u, 0u);
    }
    return;
  }

  // Positions: the new tokens are the last q_len of seq_len (context = seq_len - q_len). A token at
  // position pos sees keys [max(0, pos - window + 1), pos]; nothing of the block table past table_keys
  // is ever read, even on inconsistent metadata.
  const int context = seq_len - q_len;
  const int window = p.sliding_window;
  const int table_keys = p.max_blocks_per_seq * p.block_size;  // < 2^31: checked on the host
  auto first_key = [&](int pos) { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; };
  auto end_key = [&](int pos) { return pos + 1 < table_keys ? pos + 1 : table_keys; };

  // Keys the CTA loads: the union of its rows' ranges (positions grow with the row index).
  const int cta_pos_lo = context + row0 / group;
  const int cta_pos_hi = context + (row0 + cta_rows - 1) / group;
  const int key_begin = first_key(cta_pos_lo);
  const int key_end = end_key(cta_pos_hi);
  const int tile_first = key_begin / Cfg::kTileKeys;
  const int num_tiles = key_end > key_begin ? (key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys - tile_first : 0;

  // This warp's rows: the positions of its first and last valid row bound what the warp must compute.
  const int warp_row0 = warp * Cfg::kWarpRows;
  const bool warp_active = warp_row0 < cta_rows;
  const int warp_last = (warp_row0 + Cfg::kWarpRows < cta_rows ? warp_row0 + Cfg::kWarpRows : cta_rows) - 1;
  const int warp_pos_lo = context + (row0 + warp_row0) / group;
  const int warp_pos_hi = context + (row0 + warp_last) / group;

  // Positions of this thread's two rows (g and g + 8 of the warp); -1 for rows past cta_rows: they see
  // nothing (all masked, never written). The mask needs no table clamp: keys past key_end are zero-filled,
  // never read, and with consistent metadata no row reaches them.
  int row_pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp_row0 + g + 8 * h;
    row_pos[h] = r < cta_rows ? context + (row0 + r) / group : -1;
  }

  // ---- Q as A fragments, in registers for the whole CTA (invalid rows are zeros) ----------------------------
  uint32_t q_frag[kKSteps][4];
  {
    // 16-bit loads: the query row stride need not keep pairs 4-byte aligned; read once per CTA.
    const uint16_t* query = static_cast<const uint16_t*>(p.query);
    auto q_row = [&](int r) -> const uint16_t* {
      const int fr = row0 + r;
      return query + int64_t(q_start + fr / group) * p.q_row_stride + int64_t(kv_head * group + fr % group) * kHeadSize;
    };
    const int r_lo = warp_row0 + g, r_hi = r_lo + 8;
    const bool lo_ok = r_lo < cta_rows, hi_ok = r_hi < cta_rows;
    const uint16_t* q_lo = lo_ok ? q_row(r_lo) : query;
    const uint16_t* q_hi = hi_ok ? q_row(r_hi) : query;
    auto pair = [](const uint16_t* r, int col, bool ok) -> uint32_t {
      return ok ? uint32_t(r[col]) | (uint32_t(r[col + 1]) << 16) : 0u;
    };
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int col = ks * 16 + 2 * t;
      q_frag[ks][0] = pair(q_lo, col, lo_ok);
      q_frag[ks][1] = pair(q_hi, col, hi_ok);
      q_frag[ks][2] = pair(q_lo, col + 8, lo_ok);
      q_frag[ks][3] = pair(q_hi, col + 8, hi_ok);
    }
  }

  // ---- K/V tile loads: all 256 threads, 16 bytes each per pass -----------------------------------------------
  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int64_t token_stride = int64_t(p.num_kv_heads) * kHeadSize;
  const int64_t head_offset = int64_t(kv_head) * kHeadSize;
  const int block_size = kBlockSize > 0 ? kBlockSize : p.block_size;

  // Thread i copies chunk i % kChunks of rows i / kChunks + pass * (kThreads / kChunks): the kChunks threads
  // of one row read its 16 * kChunks contiguous bytes. Keys outside [key_begin, key_end) are zero-filled
  // (cp.async src-size 0), never read: past the sequence the cache holds stale data, possibly NaN, which
  // would poison P·V even with P = 0.
  auto load_tile = [&](int tile, int stage) {
    T* k_dst = ring + stage * Cfg::kStageElems;
    T* v_dst = k_dst + Cfg::kTileElems;
    const int key0 = tile * Cfg::kTileKeys;
#pragma unroll
    for (int pass = 0; pass < Cfg::kLoadPasses; ++pass) {
      const int c = threadIdx.x + Cfg::kThreads * pass;
      const int r = c / Cfg::kChunks, chunk = c % Cfg::kChunks;
      const int key = key0 + r;
      const bool valid = key >= key_begin && key < key_end;
      int64_t src = 0;
      if (valid) src = kv_row_offset(block_table, key, block_size, token_stride, head_offset) + chunk * 8;
      const int dst = swizzled<kHeadSize>(r, chunk);
      cp_async_16(k_dst + dst, kv + src, valid);
      cp_async_16(v_dst + dst, kv + p.v_offset + src, valid);
    }
  };

  float o_acc[kOutTiles][4];  // O fragment: n-tile j holds head dims 8j .. 8j+7 of rows g and g + 8
#pragma unroll
  for (int j = 0; j < kOutTiles; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max (base-2 units) of rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the running sums (quad-reduced at the end)

  // Consumes ring slot `stage` holding `tile`, for this warp's 16 rows.
  auto compute_tile = [&](int tile, int stage) {
    const int key0 = tile * Cfg::kTileKeys;
    const int key_last = key0 + Cfg::kTileKeys - 1;
    // Warp-uniform skip: past the warp's last diagonal, or wholly before the window of its first row.
    if (key0 > warp_pos_hi) return;
    if (window > 0 && key_last < warp_pos_lo - window + 1) return;
    // A mask is needed only where some row's range cuts the tile: the diagonal tiles, the window's first
    // tiles, and the CTA's zero-filled edges. Every other tile is visible to all 16 rows as is.
    const bool needs_mask = key_last > warp_pos_lo || (window > 0 && key0 < warp_pos_hi - window + 1) ||
                            key0 < key_begin || key_last >= key_end;
    // (Rows past cta_rows need no mask either way: their Q is zero, their scores finite, their O unwritten.)

    const T* k_tile = ring + stage * Cfg::kStageElems;
    const T* v_tile = k_tile + Cfg::kTileElems;

    // S = Q·K^T: K rows are the B operand "column-major" as stored ([key][dim]), so plain ldmatrix gives B
    // fragments. Matrices: (keys 16n..+7, chunk 2ks), (same keys, chunk 2ks+1), (keys 16n+8..+15, ...) x 2.
    float s[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const int k_row = (lane / 16) * 8 + lane % 8;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int n = 0; n < kKeyTiles; n += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + swizzled<kHeadSize>(8 * n + k_row, 2 * ks + (lane / 8) % 2));
        mma_m16n8k16<T>(s[n], q_frag[ks], kb[0], kb[1]);
        mma_m16n8k16<T>(s[n + 1], q_frag[ks], kb[2], kb[3]);
      }
    }

    // Into base-2 units; keys the row may not see (after its position, before its window) to -inf.
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= p.scale_log2;
    }
    if (needs_mask) {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * n + 2 * t + (e & 1);
          const int pos = row_pos[e / 2];
          if (key > pos || (window > 0 && key <= pos - window)) s[n][e] = -INFINITY;
        }
      }
    }

    // Online softmax. The thread holds columns 2t, 2t+1 of each n-tile for rows g (e = 0, 1) and g + 8
    // (e = 2, 3); the row's 4 threads (a quad) exchange their maxima by shuffles.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[h], tile_max);
      // A row with no visible key yet keeps max -inf; subtracting 0 then keeps every exp2 at 0, not NaN.
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      const float rescale = fast_exp2(row_max[h] - ref);
      row_max[h] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
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

    // O += P·V, 16 keys per k-step. P as the A fragment: the C fragments of S n-tiles 2kk and 2kk+1 are
    // exactly the A layout of m16n8k16 with those 16 keys as K, so P never leaves registers. V is [key][dim]
    // and the B operand wants (key pairs of one dim) per lane: ldmatrix.trans. Matrices: (keys 0-7, chunk j),
    // (keys 8-15, chunk j), (keys 0-7, chunk j+1), (keys 8-15, chunk j+1) of the k-step.
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
      const uint32_t p_frag[4] = {pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int j = 0; j < kOutTiles; j += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + swizzled<kHeadSize>(16 * kk + v_row, j + lane / 16));
        mma_m16n8k16<T>(o_acc[j], p_frag, vb[0], vb[1]);
        mma_m16n8k16<T>(o_acc[j + 1], p_frag, vb[2], vb[3]);
      }
    }
  };

  // ---- main loop: one ring for the CTA, one barrier per tile ------------------------------------------------
  // One commit per step, empty or not, keeps "group i = tile i", so wait_group<kStages - 2> means "tile i
  // landed" for this thread's copies; the barrier then makes everyone's copies visible, and orders every
  // warp's reads of the slot refilled next (it held tile i - 1) before the new copies.
#pragma unroll
  for (int st = 0; st < Cfg::kStages - 1; ++st) {
    if (st < num_tiles) load_tile(tile_first + st, st);
    cp_async_commit();
  }
  int stage = 0;
  for (int i = 0; i < num_tiles; ++i) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int ahead = i + Cfg::kStages - 1;
    const int ahead_stage = stage == 0 ? Cfg::kStages - 1 : stage - 1;
    if (ahead < num_tiles) load_tile(tile_first + ahead, ahead_stage);
    cp_async_commit();
    if (warp_active) compute_tile(tile_first + i, stage);
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();  // only empty groups can remain; nothing may be in flight when the CTA exits

  // ---- normalize and write this warp's rows --------------------------------------------------------------
  if (!warp_active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    const int r = warp_row0 + g + 8 * h;
    if (r >= cta_rows) continue;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;  // no visible key: zeros
    T* o = static_cast<T*>(p.out) + out_offset(r) + 2 * t;
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) {
      *reinterpret_cast<uint32_t*>(o + 8 * j) = pack_pair<T>(o_acc[j][2 * h] * inv, o_acc[j][2 * h + 1] * inv);
    }
  }
}

}  // namespace pagedinfer::attention
