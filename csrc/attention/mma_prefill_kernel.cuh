// Paged attention for prompt chunks on tensor cores (fp16/bf16, head_size 64 or 128), FlashAttention-2
// style: one CTA per (sequence, kv head, tile of 128 query rows), where the rows are the sequence's
// (new token, query head of the kv head's group) pairs, token-major. Packing the GQA group into the M rows
// lets every K/V tile, read once from the paged cache into shared memory, serve all heads of the group
// and 128 / group tokens at once (Llama-3 8B: 32 tokens x 4 heads).
//
// Two shapes of the same CTA (kMTiles, picked by the launcher):
//   kMTiles 1: 8 warps x 16 rows, Q fragments in registers, a 3-stage K/V ring; ~225 registers a thread
//              for head 128, so one CTA per SM.
//   kMTiles 2: 4 warps x 32 rows (two m16 tiles each; FlashAttention-2's shape), Q in shared memory and
//              re-read per k-step, a 2-stage ring; two CTAs per SM, so one CTA's prologue, barrier waits
//              and epilogue hide behind the other's math, and each K/V fragment read from shared memory
//              feeds two MMAs instead of one (0.31 instead of 0.5 ldmatrix per MMA).
// Keys stream in tiles of 64 through a cp.async ring shared by all warps (one __syncthreads per tile).
// Per tile and warp:
//   S[rows x 64 keys] = Q·K^T         (K by ldmatrix)
//   causal / window mask, only on tiles that cut through some row's visible range
//   online softmax in registers       (the C fragment of S is re-packed as the A fragment of P)
//   O[rows x D] += P·V                (V by ldmatrix.trans)
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

template <typename T, int kHeadSize, int kMTiles>
struct MmaPrefillConfig {
  static_assert(kHeadSize == 64 || kHeadSize == 128, "the tensor-core path is specialized for 64 and 128");
  static_assert(kMTiles == 1 || kMTiles == 2, "16 or 32 rows per warp");
  static constexpr int kWarpRows = 16 * kMTiles;       // m16 tiles of mma.sync per warp
  // 128 rows per CTA: each K/V byte brought into shared memory feeds 128 rows of math. With 64 rows the
  // L2 -> SM traffic of a long causal prefill would approach the L2 bandwidth at the target FLOP rate.
  static constexpr int kRows = 128;
  static constexpr int kWarps = kRows / kWarpRows;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileKeys = 64;                 // keys per tile of the ring (one barrier each)
  // Keys per online-softmax step (the N of Q·K^T, the K of P·V): S of a warp lives in registers from Q·K^T
  // to P·V, and 32 rows x 64 keys of it beside a 32 x 128 O would spill; 32 keys keep it in 255 registers.
  static constexpr int kStepKeys = kMTiles > 1 ? 32 : 64;
  static constexpr int kSteps = kTileKeys / kStepKeys;
  // Q in shared memory when a warp's Q fragments would not fit in registers beside O and S.
  static constexpr bool kQInSmem = kMTiles > 1;
  // Tiles in the ring: kStages - 1 in flight while the warps compute one. Two CTAs per SM (kMTiles 2)
  // leave room for 2 stages only; the other CTA covers the latency a third would hide.
  static constexpr int kStages = kMTiles > 1 ? 2 : 3;
  static constexpr int kChunks = kHeadSize / 8;        // 16-byte chunks per K/V (or Q) row
  static constexpr int kLoadPasses = kTileKeys * kChunks / kThreads;
  static_assert(kTileKeys * kChunks % kThreads == 0, "every thread copies the same number of chunks");
  static constexpr int kQPasses = kRows * kChunks / kThreads;
  static constexpr int kTileElems = kTileKeys * kHeadSize;
  static constexpr int kStageElems = 2 * kTileElems;   // K tile, then V tile
  static constexpr int kQElems = kQInSmem ? kRows * kHeadSize : 0;
  // kMTiles 1: 96 KB (head 128), 48 KB (64). kMTiles 2: 96 KB, 48 KB (Q 32 KB / 16 KB of it).
  static constexpr int kSmemBytes = (kStages * kStageElems + kQElems) * int(sizeof(T));
  // kMTiles 1: ~215 registers for head 128 (Q, O and S fragments), one CTA per SM (head 64 would need 128
  // registers for two and spill). kMTiles 2: at most 255 registers, two CTAs per SM (shared memory 2 x 96 KB).
  static constexpr int kMinCtasPerSm = kMTiles > 1 ? 2 : 1;
};

// Number of row tiles a sequence of q_len new tokens needs (host and device agree on it).
__host__ __device__ constexpr int64_t prefill_row_tiles(int64_t q_len, int64_t group, int64_t rows_per_cta) {
  return (q_len * group + rows_per_cta - 1) / rows_per_cta;
}

// kBlockSize: 16 or 32 (compile time: the block of a key is a shift away), or 0 (any block size).
// row_tiles: prefill_row_tiles(max_query_len, group, kRows), from host ints only (CUDA-graph safe).
template <typename T, int kHeadSize, int kBlockSize, int kMTiles>
__global__ void __launch_bounds__(MmaPrefillConfig<T, kHeadSize, kMTiles>::kThreads,
                                  MmaPrefillConfig<T, kHeadSize, kMTiles>::kMinCtasPerSm)
    mma_prefill_attention_kernel(const PagedAttentionParams p, const int row_tiles) {
  using Cfg = MmaPrefillConfig<T, kHeadSize, kMTiles>;
  constexpr int kKSteps = kHeadSize / 16;             // k-steps of Q·K^T
  constexpr int kOutTiles = kHeadSize / 8;            // n-tiles of P·V
  constexpr int kKeyTiles = Cfg::kStepKeys / 8;      // n-tiles of S
  constexpr int kPSteps = Cfg::kStepKeys / 16;        // k-steps of P·V

  extern __shared__ __align__(16) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);
  T* q_smem = ring + Cfg::kStages * Cfg::kStageElems;  // [kRows][kHeadSize], swizzled (kQInSmem only)

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
  if (row0 >= seq_rows || (p.decodes_elsewhere && q_len == 1)) return;  // uniform: nothing of this sequence here
  const int cta_rows = seq_rows - row0 < Cfg::kRows ? seq_rows - row0 : Cfg::kRows;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // fragment coordinates: row group and thread-in-group
  // Flat row r of this CTA is (token q_start + (row0 + r) / group, head (row0 + r) % group of the group).
  auto out_offset = [&](int r) -> int64_t {
    const int fr = row0 + r;
    return (int64_t(q_start + fr / group) * p.num_heads + kv_head * group + fr % group) * kHeadSize;
  };
  auto query_offset = [&](int r) -> int64_t {
    const int fr = row0 + r;
    return int64_t(q_start + fr / group) * p.q_row_stride + int64_t(kv_head * group + fr % group) * kHeadSize;
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

  // Keys the CTA loads: the union of its rows' ranges (positions grow with the row index).
  const int cta_pos_lo = context + row0 / group;
  const int cta_pos_hi = context + (row0 + cta_rows - 1) / group;
  const int key_begin = first_key(cta_pos_lo);
  const int key_end = cta_pos_hi + 1 < table_keys ? cta_pos_hi + 1 : table_keys;
  const int tile_first = key_begin / Cfg::kTileKeys;
  const int num_tiles = key_end > key_begin ? (key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys - tile_first : 0;

  // This warp's rows: the positions of its first and last valid row bound what the warp must compute.
  const int warp_row0 = warp * Cfg::kWarpRows;
  const bool warp_active = warp_row0 < cta_rows;
  const int warp_last = (warp_row0 + Cfg::kWarpRows < cta_rows ? warp_row0 + Cfg::kWarpRows : cta_rows) - 1;
  const int warp_pos_lo = context + (row0 + warp_row0) / group;
  const int warp_pos_hi = context + (row0 + warp_last) / group;

  // Position of this thread's row g + 8h of m16 tile mt; -1 past cta_rows: such rows see nothing (all
  // masked, never written). Recomputed where a mask is needed (diagonal and window-edge tiles only) rather
  // than held in registers across the loop. The mask needs no table clamp: keys past key_end are
  // zero-filled, never read, and with consistent metadata no row reaches them.
  auto row_position = [&](int mt, int h) {
    const int r = warp_row0 + 16 * mt + g + 8 * h;
    return r < cta_rows ? context + (row0 + r) / group : -1;
  };

  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int64_t token_stride = int64_t(p.num_kv_heads) * kHeadSize;
  const int64_t head_offset = int64_t(kv_head) * kHeadSize;
  const int block_size = kBlockSize > 0 ? kBlockSize : p.block_size;

  // ---- Q: A fragments in registers (kMTiles 1), or the CTA's 128 rows in shared memory (kMTiles 2) --------
  // Invalid rows are zeros. Registers: 16-bit loads (the query row stride need not keep pairs 4-byte
  // aligned); read once per CTA.
  uint32_t q_frag[Cfg::kQInSmem ? 1 : kKSteps][4];  // unused (optimized away) with Q in shared memory
  if constexpr (!Cfg::kQInSmem) {
    const uint16_t* query = static_cast<const uint16_t*>(p.query);
    const int r_lo = warp_row0 + g, r_hi = r_lo + 8;
    const bool lo_ok = r_lo < cta_rows, hi_ok = r_hi < cta_rows;
    load_a_fragments(q_frag, lo_ok ? query + query_offset(r_lo) : query, lo_ok,
                     hi_ok ? query + query_offset(r_hi) : query, hi_ok, t);
  } else {
    // Same chunk layout as the K/V tiles. 16-byte aligned rows (the usual case: a contiguous query, or a
    // view of a qkv row at a multiple of 8 elements) go by cp.async, in the first tile's commit group, so
    // their latency overlaps the K/V prologue; others by 16-bit loads. The main loop's first barrier makes
    // either visible to every warp.
    const bool aligned = reinterpret_cast<uintptr_t>(p.query) % 16 == 0 && p.q_row_stride % 8 == 0;
    const T* query = static_cast<const T*>(p.query);
#pragma unroll
    for (int pass = 0; pass < Cfg::kQPasses; ++pass) {
      const int c = threadIdx.x + Cfg::kThreads * pass;
      const int r = c / Cfg::kChunks, chunk = c % Cfg::kChunks;
      const bool valid = r < cta_rows;
      T* dst = q_smem + swizzled<kHeadSize>(r, chunk);
      const T* src = valid ? query + query_offset(r) + chunk * 8 : query;
      if (aligned) {
        cp_async_16(dst, src, valid);
      } else {
        const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = valid ? uint32_t(s16[2 * i]) | (uint32_t(s16[2 * i + 1]) << 16) : 0u;
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // ---- K/V tile loads: every thread, 16 bytes each per pass -------------------------------------------------
  // Thread i copies chunk i % kChunks of rows i / kChunks + pass * (kThreads / kChunks): the kChunks threads
  // of one row read its 16 * kChunks contiguous bytes. Keys outside [key_begin, key_end) are zero-filled
  // (cp.async src-size 0), never read: past the sequence the cache holds stale data, possibly NaN, which
  // would poison P·V even with P = 0.
  // A pass moves the thread down kRowsPerPass rows, a multiple of 8: its swizzle (row % 8) stays the same,
  // so every pass's shared-memory offset is the first one's plus a constant (no registers held per pass).
  constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunks;
  static_assert(kRowsPerPass % 8 == 0, "the swizzle must repeat from pass to pass");
  const int ld_row = threadIdx.x / Cfg::kChunks;
  const int ld_chunk = threadIdx.x % Cfg::kChunks;
  const int ld_dst = swizzled<kHeadSize>(ld_row, ld_chunk);
  const T* k_src = kv + head_offset + ld_chunk * 8;
  auto load_tile = [&](int tile, int stage) {
    T* k_dst = ring + stage * Cfg::kStageElems + ld_dst;
    const int key0 = tile * Cfg::kTileKeys + ld_row;
#pragma unroll
    for (int pass = 0; pass < Cfg::kLoadPasses; ++pass) {
      const int key = key0 + pass * kRowsPerPass;
      const bool valid = key >= key_begin && key < key_end;
      int64_t src = 0;
      if (valid) src = kv_row_offset(block_table, key, block_size, token_stride, 0);
      T* dst = k_dst + pass * kRowsPerPass * kHeadSize;
      cp_async_16(dst, k_src + src, valid);
      cp_async_16(dst + Cfg::kTileElems, k_src + p.v_offset + src, valid);
    }
  };

  float o_acc[kMTiles][kOutTiles][4];  // O fragments: n-tile j holds head dims 8j .. 8j+7 of rows g, g + 8
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) o_acc[mt][j][0] = o_acc[mt][j][1] = o_acc[mt][j][2] = o_acc[mt][j][3] = 0.f;
  }
  float row_max[kMTiles][2];  // running max (raw scores) of rows g and g + 8 of each m16 tile
  float row_sum[kMTiles][2];  // this thread's share of the running sums (quad-reduced at the end)
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  // One online-softmax step over keys [key0, key0 + kStepKeys), whose K and V rows start at k_tile and
  // v_tile in the ring, for this warp's rows.
  auto compute_step = [&](int key0, const T* k_tile, const T* v_tile) {
    const int key_last = key0 + Cfg::kStepKeys - 1;
    // Warp-uniform skip: past the warp's last diagonal, or wholly before the window of its first row.
    if (key0 > warp_pos_hi) return;
    if (window > 0 && key_last < warp_pos_lo - window + 1) return;
    // A mask is needed only where some row's range cuts the keys: the diagonal, the window's first keys,
    // and the CTA's zero-filled edges. Everywhere else all the warp's rows see every key as is.
    // (Rows past cta_rows need no mask either way: their Q is zero, their scores finite, their O unwritten.)
    const bool needs_mask = key_last > warp_pos_lo || (window > 0 && key0 < warp_pos_hi - window + 1) ||
                            key0 < key_begin || key_last >= key_end;

    // S = Q·K^T: K rows are the B operand "column-major" as stored ([key][dim]), so plain ldmatrix gives B
    // fragments. Matrices: (keys 16n..+7, chunk 2ks), (same keys, chunk 2ks+1), (keys 16n+8..+15, ...) x 2.
    // Q from shared memory: plain ldmatrix gives A fragments, matrices (rows 0-7, chunk 2ks), (rows 8-15,
    // chunk 2ks), (rows 0-7, chunk 2ks+1), (rows 8-15, chunk 2ks+1) of the m16 tile.
    float s[kMTiles][kKeyTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    }
    const int k_row = (lane / 16) * 8 + lane % 8;
    const int q_row = warp_row0 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t qa[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (Cfg::kQInSmem) {
          ldmatrix_x4(qa[mt], q_smem + swizzled<kHeadSize>(q_row + 16 * mt, 2 * ks + lane / 16));
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[mt][i] = q_frag[ks][i];
        }
      }
#pragma unroll
      for (int n = 0; n < kKeyTiles; n += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + swizzled<kHeadSize>(8 * n + k_row, 2 * ks + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(s[mt][n], qa[mt], kb[0], kb[1]);
          mma_m16n8k16<T>(s[mt][n + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      // Keys the row may not see (after its position, before its window) to -inf. Scores stay in raw units:
      // the scale (> 0, checked by the launcher, so maxima commute with it) joins the subtraction of the max
      // in one FFMA per score, as exp2(s * scale_log2 - max * scale_log2).
      if (needs_mask) {
        const int pos[2] = {row_position(mt, 0), row_position(mt, 1)};
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + 8 * n + 2 * t + (e & 1);
            if (key > pos[e / 2] || (window > 0 && key <= pos[e / 2] - window)) s[mt][n][e] = -INFINITY;
          }
        }
      }

      // Online softmax. The thread holds columns 2t, 2t+1 of each n-tile for rows g (e = 0, 1) and g + 8
      // (e = 2, 3); the row's 4 threads (a quad) exchange their maxima by shuffles.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[mt][h], tile_max);
        // A row with no visible key yet keeps max -inf; subtracting 0 then keeps every exp2 at 0, not NaN.
        const float ref = new_max == -INFINITY ? 0.f : new_max * p.scale_log2;
        // Exactly 1 when the max did not move (the vote below relies on it), 0 on the first visible keys.
        const float rescale = row_max[mt][h] == new_max ? 1.f : fast_exp2(row_max[mt][h] * p.scale_log2 - ref);
        row_max[mt][h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
          s[mt][n][2 * h] = fast_exp2(fmaf(s[mt][n][2 * h], p.scale_log2, -ref));
          s[mt][n][2 * h + 1] = fast_exp2(fmaf(s[mt][n][2 * h + 1], p.scale_log2, -ref));
          sum += s[mt][n][2 * h] + s[mt][n][2 * h + 1];
        }
        row_sum[mt][h] = row_sum[mt][h] * rescale + sum;
        // Rescaling O costs kOutTiles * 2 multiplies a row, as many as the step's MMAs issue; once the
        // running maxima settle (most steps of a long row) no row of the warp needs it: a warp vote skips it.
        if (__any_sync(0xffffffffu, rescale != 1.f)) {
#pragma unroll
          for (int j = 0; j < kOutTiles; ++j) {
            o_acc[mt][j][2 * h] *= rescale;
            o_acc[mt][j][2 * h + 1] *= rescale;
          }
        }
      }
    }

    // O += P·V, 16 keys per k-step. P as the A fragment: the C fragments of S n-tiles 2kk and 2kk+1 are
    // exactly the A layout of m16n8k16 with those 16 keys as K, so P never leaves registers. V is [key][dim]
    // and the B operand wants (key pairs of one dim) per lane: ldmatrix.trans. Matrices: (keys 0-7, chunk j),
    // (keys 8-15, chunk j), (keys 0-7, chunk j+1), (keys 8-15, chunk j+1) of the k-step.
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
      uint32_t p_frag[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        p_frag[mt][0] = pack_pair<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        p_frag[mt][1] = pack_pair<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        p_frag[mt][2] = pack_pair<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        p_frag[mt][3] = pack_pair<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int j = 0; j < kOutTiles; j += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + swizzled<kHeadSize>(16 * kk + v_row, j + lane / 16));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(o_acc[mt][j], p_frag[mt], vb[0], vb[1]);
          mma_m16n8k16<T>(o_acc[mt][j + 1], p_frag[mt], vb[2], vb[3]);
        }
      }
    }
  };

  // ---- main loop: one ring for the CTA, one barrier per tile ------------------------------------------------
  // One commit per step, empty or not, keeps "group i = tile i" (Q's copies ride in group 0), so
  // wait_group<kStages - 2> means "tile i landed" for this thread's copies; the barrier then makes everyone's
  // copies visible, and orders every warp's reads of the slot refilled next (it held tile i - 1) before the
  // new copies.
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
    if (warp_active) {
      // Steps start at row multiples of 32 of the tile: the swizzle (row % 8) is the same in each.
      const T* k_tile = ring + stage * Cfg::kStageElems;
#pragma unroll
      for (int step = 0; step < Cfg::kSteps; ++step) {
        const int offset = step * Cfg::kStepKeys * kHeadSize;
        compute_step((tile_first + i) * Cfg::kTileKeys + step * Cfg::kStepKeys, k_tile + offset,
                     k_tile + Cfg::kTileElems + offset);
      }
    }
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();  // only empty groups (or, with no tile, Q's) can remain; none may outlive the CTA

  // ---- normalize and write this warp's rows --------------------------------------------------------------
  if (!warp_active) return;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[mt][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = warp_row0 + 16 * mt + g + 8 * h;
      if (r >= cta_rows) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key: zeros
      T* o = static_cast<T*>(p.out) + out_offset(r) + 2 * t;
#pragma unroll
      for (int j = 0; j < kOutTiles; ++j) {
        *reinterpret_cast<uint32_t*>(o + 8 * j) = pack_pair<T>(o_acc[mt][j][2 * h] * inv, o_acc[mt][j][2 * h + 1] * inv);
      }
    }
  }
}

}  // namespace pagedinfer::attention
