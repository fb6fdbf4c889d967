// Paged attention for prompt chunks on Hopper's warpgroup MMA (sm_90a; fp16/bf16, head_size 64 or 128).
// Same work split and semantics as mma_prefill_kernel.cuh (one CTA per (sequence, kv head, tile of 128
// (token, head-of-group) rows, token-major), masks only where a row's range cuts a tile, tiles no row sees
// skipped, invalid keys zero-filled, padded rows -> zeros), with the two products on wgmma:
//
//   CTA = 2 warpgroups (256 threads), each owning 64 of the 128 rows (warp w of a warpgroup: 16 rows).
//   Shared memory, every operand in the 128-byte-swizzle canonical layout (rows of 64 elements = 128 B,
//   atoms of 8 rows = 1 KB, 1 KB aligned, 16-byte chunk c of row r at chunk c ^ (r % 8)); a head of 128
//   is two such "halves" (dims 0-63, 64-127), each its own region of rows:
//     Q     [half][128 rows][64]     loaded once (cp.async), the A operand of S = Q·K^T (K-major)
//     ring  kStages x { K [half][64 keys][64], V [half][64 keys][64] }, gathered from the paged cache by
//           cp.async (per-row addresses: TMA cannot gather paged rows), one __syncthreads per tile
//   Per 64-key tile and warpgroup (skipped as a whole when none of its 64 rows sees the tile):
//     S[64 x 64] = Q·K^T     head/16 x wgmma m64n64k16, A = Q (smem, K-major), B = K rows (smem, K-major)
//     mask (diagonal / window-edge / zero-filled-edge tiles only), online softmax on the fp32 accumulator
//     O[64 x head] += P·V    4 k-steps x head/64 x wgmma m64n64k16, A = P from registers (the accumulator
//                            fragment of 16 keys is the A fragment), B = V rows (smem, MN-major: tnspB)
//   Pipelined (the default): a tile's P·V is issued behind the next tile's Q·K^T and runs on the tensor
//   cores during that tile's softmax (FlashAttention-3's intra-warpgroup overlap); the two warpgroups'
//   softmax and MMAs also interleave on the SM (one CTA per SM: 193 KB / 97 KB of shared memory). The
//   ring has 5 slots: 3 tiles in flight ahead of the one computed while the previous one's V is still read.
//
// Descriptors (wgmma.cuh: wgmma_desc_sw128), all 128-byte swizzle, base offset 0 (atoms 1 KB aligned):
//   Q, K (K-major): stride byte offset 1024 (from one 8-row atom to the next along M/N); leading byte
//     offset unused (one k-step's 32 bytes never leave a 128-byte row) and set to 16 (encoded 1). k-step
//     ks reads half ks / 4 at start + 32 * (ks % 4) bytes: the hardware applies the swizzle to the
//     address it forms, so an in-atom start offset selects columns 16 (ks % 4) .. + 15.
//   V (MN-major, N = one 64-wide half = exactly one atom width): the 16 keys of a k-step are two 8-row
//     atoms 1024 bytes apart; both offsets are set to 1024 (the one of them that steps from 8 keys to the
//     next is 1024 either way; the other, the step to the next 64-wide MN atom, is never used at N = 64).
//     k-step kk of half h starts at h * 8 KB + kk * 2 KB.
#pragma once

#include <cstdint>

#include "attention/attention_params.cuh"
#include "attention/mma_prefill_kernel.cuh"  // prefill_row_tiles
#include "attention/ptx.cuh"
#include "attention/wgmma.cuh"

namespace pagedinfer::attention {

template <typename T, int kHeadSize>
struct WgmmaPrefillConfig {
  static_assert(kHeadSize == 64 || kHeadSize == 128, "the wgmma path is specialized for 64 and 128");
  static constexpr int kRows = 128;                    // rows per CTA (as the mma.sync kernel: same grid)
  static constexpr int kWarpgroups = 2;                // 64 rows each
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kTileKeys = 64;                 // keys per tile (the N of S, the K of P·V)
  static constexpr int kStages = 5;                    // ring slots (tiles in flight: see the main loop)
  static constexpr int kHalves = kHeadSize / 64;       // 64-element (128-byte) column halves of a row
  static constexpr int kChunks = kHeadSize / 8;        // 16-byte chunks per row
  static constexpr int kRowBytes = 128;                // of one half-row: the swizzle span
  static constexpr int kTileHalfBytes = kTileKeys * kRowBytes;   // 8 KB
  static constexpr int kTileBytes = kHalves * kTileHalfBytes;    // K (or V) of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;             // K then V
  static constexpr int kQHalfBytes = kRows * kRowBytes;          // 16 KB
  static constexpr int kQBytes = kHalves * kQHalfBytes;
  // + 1 KB: the dynamic shared memory base is aligned up to the 1 KB the swizzle atoms need.
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + 1024;  // 193 KB (128), 97 KB (64)
  static constexpr int kLoadPasses = kTileKeys * kChunks / kThreads;
  static constexpr int kQPasses = kRows * kChunks / kThreads;
  static_assert(kTileKeys * kChunks % kThreads == 0 && kRows * kChunks % kThreads == 0, "equal shares");
};

// Byte offset of 16-byte chunk `chunk` (0 .. kHeadSize / 8 - 1) of row `row` in a [half][rows][64] region
// of `half_bytes` per half: the 128-byte-swizzle canonical layout.
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk, int half_bytes) {
  return uint32_t((chunk >> 3) * half_bytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Tells the host whether the device code it would run was built with wgmma (sm_90a / compute_90a) or
// without (a plain sm_90 or older target, where the prefill kernel traps): only the wgmma build gives this
// kernel kWgmmaProbeSmemBytes of static shared memory, which cudaFuncGetAttributes reports without a launch
// (so the check is also legal during CUDA-graph capture). Never launched.
constexpr int kWgmmaProbeSmemBytes = 2048;
__global__ void wgmma_build_probe_kernel(int* out) {
#if PAGEDINFER_WGMMA
  __shared__ volatile int marker[kWgmmaProbeSmemBytes / 4];
  marker[threadIdx.x % (kWgmmaProbeSmemBytes / 4)] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = marker[(threadIdx.x + 1) % (kWgmmaProbeSmemBytes / 4)];
#else
  if (out == nullptr) __trap();
#endif
}

// kBlockSize: 16 or 32 (compile time), or 0 (any block size). row_tiles: prefill_row_tiles(max_query_len,
// group, kRows), from host ints only (CUDA-graph safe).
// kPipelined: each tile's P·V runs during the next tile's softmax (FlashAttention-3's intra-warpgroup
// overlap); false: issued and waited for within the tile (simpler; kept for A/B and as a fallback).
template <typename T, int kHeadSize, int kBlockSize, bool kPipelined>
__global__ void __launch_bounds__(WgmmaPrefillConfig<T, kHeadSize>::kThreads, 1)
    wgmma_prefill_attention_kernel(const PagedAttentionParams p, const int row_tiles) {
#if PAGEDINFER_WGMMA
  using Cfg = WgmmaPrefillConfig<T, kHeadSize>;
  constexpr int kKSteps = kHeadSize / 16;  // k-steps of Q·K^T
  constexpr int kPSteps = Cfg::kTileKeys / 16;  // k-steps of P·V

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_address(smem_raw);
  unsigned char* smem = smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u);
  unsigned char* q_smem = smem;                  // [half][kRows][64]
  unsigned char* ring = smem + Cfg::kQBytes;     // kStages x (K [half][64][64], V [half][64][64])
  const uint32_t q_addr = smem_address(q_smem);
  const uint32_t ring_addr = smem_address(ring);

  // ---- which rows this CTA serves (as mma_prefill_attention_kernel) -----------------------------------------
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
  const int row0 = row_tile * Cfg::kRows;
  if (row0 >= seq_rows || (p.decodes_elsewhere && q_len == 1)) return;  // uniform
  const int cta_rows = seq_rows - row0 < Cfg::kRows ? seq_rows - row0 : Cfg::kRows;

  const int lane = threadIdx.x % 32;
  const int wg = threadIdx.x / 128;              // warpgroup
  const int wg_warp = (threadIdx.x / 32) % 4;    // warp within the warpgroup: its 16 rows
  const int g = lane / 4, t = lane % 4;          // accumulator fragment coordinates
  auto out_offset = [&](int r) -> int64_t {
    const int fr = row0 + r;
    return (int64_t(q_start + fr / group) * p.num_heads + kv_head * group + fr % group) * kHeadSize;
  };
  auto query_offset = [&](int r) -> int64_t {
    const int fr = row0 + r;
    return int64_t(q_start + fr / group) * p.q_row_stride + int64_t(kv_head * group + fr % group) * kHeadSize;
  };

  if (seq_len <= 0) {  // padded row: zeros
    constexpr int kVecs = kHeadSize / 8;
    for (int i = threadIdx.x; i < cta_rows * kVecs; i += Cfg::kThreads) {
      T* o = static_cast<T*>(p.out) + out_offset(i / kVecs) + (i % kVecs) * 8;
      *reinterpret_cast<uint4*>(o) = make_uint4(0u, 0u, 0u, 0u);
    }
    return;
  }

  const int context = seq_len - q_len;
  const int window = p.sliding_window;
  const int table_keys = p.max_blocks_per_seq * p.block_size;
  auto first_key = [&](int pos) { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; };

  const int cta_pos_lo = context + row0 / group;
  const int cta_pos_hi = context + (row0 + cta_rows - 1) / group;
  const int key_begin = first_key(cta_pos_lo);
  const int key_end = cta_pos_hi + 1 < table_keys ? cta_pos_hi + 1 : table_keys;
  const int tile_first = key_begin / Cfg::kTileKeys;
  const int num_tiles = key_end > key_begin ? (key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys - tile_first : 0;

  // This warpgroup's rows (wgmma is warpgroup-wide: every skip decision below is uniform over them).
  const int wg_row0 = wg * 64;
  const bool wg_active = wg_row0 < cta_rows;
  const int wg_last = (wg_row0 + 64 < cta_rows ? wg_row0 + 64 : cta_rows) - 1;
  const int wg_pos_lo = context + (row0 + wg_row0) / group;
  const int wg_pos_hi = context + (row0 + wg_last) / group;
  // Position of this thread's row g + 8h of its warp; -1 past cta_rows (sees nothing, never written).
  auto row_position = [&](int h) {
    const int r = wg_row0 + 16 * wg_warp + g + 8 * h;
    return r < cta_rows ? context + (row0 + r) / group : -1;
  };

  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int64_t token_stride = int64_t(p.num_kv_heads) * kHeadSize;
  const int64_t head_offset = int64_t(kv_head) * kHeadSize;
  const int block_size = kBlockSize > 0 ? kBlockSize : p.block_size;

  // ---- Q -> shared memory (rows past cta_rows zeros), in the first tile's commit group -------------------
  {
    const bool aligned = reinterpret_cast<uintptr_t>(p.query) % 16 == 0 && p.q_row_stride % 8 == 0;
    const T* query = static_cast<const T*>(p.query);
#pragma unroll
    for (int pass = 0; pass < Cfg::kQPasses; ++pass) {
      const int c = threadIdx.x + Cfg::kThreads * pass;
      const int r = c / Cfg::kChunks, chunk = c % Cfg::kChunks;
      const bool valid = r < cta_rows;
      unsigned char* dst = q_smem + sw128_offset(r, chunk, Cfg::kQHalfBytes);
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

  // ---- K/V tile loads (as mma_prefill_attention_kernel, into the swizzled halves) ----------------------------
  // Thread i copies chunk i % kChunks of rows i / kChunks + pass * kRowsPerPass; kRowsPerPass is a multiple
  // of 8, so every pass lands at the first pass's offset plus pass * kRowsPerPass * 128 bytes. Keys outside
  // [key_begin, key_end) are zero-filled (src-size 0), never read: stale cache rows may hold NaN.
  constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunks;
  static_assert(kRowsPerPass % 8 == 0, "the swizzle must repeat from pass to pass");
  const int ld_row = threadIdx.x / Cfg::kChunks;
  const int ld_chunk = threadIdx.x % Cfg::kChunks;
  const uint32_t ld_dst = sw128_offset(ld_row, ld_chunk, Cfg::kTileHalfBytes);
  const T* k_src = kv + head_offset + ld_chunk * 8;
  auto load_tile = [&](int tile, int stage) {
    unsigned char* k_dst = ring + stage * Cfg::kStageBytes + ld_dst;
    const int key0 = tile * Cfg::kTileKeys + ld_row;
#pragma unroll
    for (int pass = 0; pass < Cfg::kLoadPasses; ++pass) {
      const int key = key0 + pass * kRowsPerPass;
      const bool valid = key >= key_begin && key < key_end;
      int64_t src = 0;
      if (valid) src = kv_row_offset(block_table, key, block_size, token_stride, 0);
      unsigned char* dst = k_dst + pass * kRowsPerPass * Cfg::kRowBytes;
      cp_async_16(dst, k_src + src, valid);
      cp_async_16(dst + Cfg::kTileBytes, k_src + p.v_offset + src, valid);
    }
  };

  // O accumulators: o[h] is the m64n64 fragment of head dims 64h .. 64h + 63: element 4j + e holds row
  // g + 8 (e / 2) of the warp's 16, dim 64h + 8j + 2t + (e % 2).
  float o[Cfg::kHalves][32];
#pragma unroll
  for (int h = 0; h < Cfg::kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) o[h][i] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max (raw scores) of rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the running sums
  float s[32];                                // S, then P, of the current tile (accumulator layout)
  uint32_t pa[kPSteps][4];                    // P as bf16/fp16 A fragments, one per k-step of P·V
  // Pipelined: P of the previous visible tile waits in pa for its P·V, issued behind the next tile's
  // Q·K^T so that it runs on the tensor cores while this warpgroup does that tile's softmax.
  bool p_pending = false;   // warpgroup-uniform
  uint32_t p_v_addr = 0;    // V of the pending P·V

  // This warpgroup's 64 rows of each Q half.
  const uint32_t q_wg_addr = q_addr + wg_row0 * Cfg::kRowBytes;

  // S = Q·K^T, issued and committed (one wgmma group), not waited for.
  auto issue_qk = [&](uint32_t k_addr) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const uint32_t in_row = uint32_t(ks & 3) * 32u;  // bytes into the 128-byte rows: columns 16 (ks % 4) ..
      const uint64_t da = wgmma_desc_sw128(q_wg_addr + (ks >> 2) * Cfg::kQHalfBytes + in_row, 16, 1024);
      const uint64_t db = wgmma_desc_sw128(k_addr + (ks >> 2) * Cfg::kTileHalfBytes + in_row, 16, 1024);
      if (ks == 0) Wgmma<T, 64>::ss_first(s, da, db);
      else Wgmma<T, 64>::ss(s, da, db, true);
    }
    wgmma_commit();
  };
  // O += P·V from pa, issued and committed, not waited for.
  auto issue_pv = [&](uint32_t v_addr) {
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) wgmma_fence_operand(o[h][i]);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
      for (int h = 0; h < Cfg::kHalves; ++h) {
        const uint64_t dv =
            wgmma_desc_sw128(v_addr + h * Cfg::kTileHalfBytes + kk * 16 * Cfg::kRowBytes, 1024, 1024);
        Wgmma<T, 64>::rs_tn(o[h], pa[kk], dv);
      }
    }
    wgmma_commit();
  };
  // After the wait for a P·V: O and pa are the compiler's again.
  auto pv_done = [&]() {
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) wgmma_fence_operand(o[h][i]);
    }
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) wgmma_fence_operand(pa[kk][i]);
    }
  };

  // Mask and online softmax of S (landed) for keys key0 ..: s becomes P (unnormalized, fp32), row_max and
  // row_sum advance; O's rescale factors are returned, not applied (a P·V may still be writing O).
  auto softmax = [&](int key0, bool needs_mask, float (&rescale)[2]) {
#pragma unroll
    for (int i = 0; i < 32; ++i) wgmma_fence_operand(s[i]);
    if (needs_mask) {
      const int pos[2] = {row_position(0), row_position(1)};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * j + 2 * t + (e & 1);
          if (key > pos[e / 2] || (window > 0 && key <= pos[e / 2] - window)) s[4 * j + e] = -INFINITY;
        }
      }
    }
    // The row's 4 threads (a quad) hold its 64 scores, 16 each.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[h], tile_max);
      // A row with no visible key yet keeps max -inf; subtracting 0 then keeps every exp2 at 0, not NaN.
      const float ref = new_max == -INFINITY ? 0.f : new_max * p.scale_log2;
      rescale[h] = row_max[h] == new_max ? 1.f : fast_exp2(row_max[h] * p.scale_log2 - ref);
      row_max[h] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[4 * j + 2 * h] = fast_exp2(fmaf(s[4 * j + 2 * h], p.scale_log2, -ref));
        s[4 * j + 2 * h + 1] = fast_exp2(fmaf(s[4 * j + 2 * h + 1], p.scale_log2, -ref));
        sum += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
      }
      row_sum[h] = row_sum[h] * rescale[h] + sum;
    }
  };
  // O *= rescale (skipped by a warp vote once the maxima settle), then P -> pa: accumulator n-blocks 2kk
  // (keys 16kk + 0..7) and 2kk + 1 (+8..15) are the A-fragment layout with those keys as K.
  auto rescale_and_pack = [&](const float (&rescale)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (__any_sync(0xffffffffu, rescale[h] != 1.f)) {
#pragma unroll
        for (int d = 0; d < Cfg::kHalves; ++d) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            o[d][4 * j + 2 * h] *= rescale[h];
            o[d][4 * j + 2 * h + 1] *= rescale[h];
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
      pa[kk][0] = pack_pair<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack_pair<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack_pair<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack_pair<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // ---- main loop: one ring, one barrier per tile --------------------------------------------------------
  // kAhead tiles are in flight while the warpgroups compute: kStages - 1 (serial: a slot is free again
  // once both warpgroups are past its tile), or kStages - 2 (pipelined: the previous tile's V is still read
  // by the P·V issued during this one). Group i = tile i (Q rides in group 0): after wait_group<kAhead - 1>
  // this thread's copies of tile i have landed; the proxy fence orders them (and Q's plain stores, if any)
  // before wgmma's reads, and the barrier extends that to every thread. The barrier also orders both
  // warpgroups' finished wgmma reads of the slot refilled next (tile i - 1, serial, or i - 2, pipelined:
  // each warpgroup waits for every wgmma on it before it reaches this barrier) before the new copies.
  constexpr int kAhead = kPipelined ? Cfg::kStages - 2 : Cfg::kStages - 1;
  static_assert(kAhead >= 1, "at least one tile in flight");
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    if (st < num_tiles) load_tile(tile_first + st, st);
    cp_async_commit();
  }
  int stage = 0;                       // slot of tile i
  int load_stage = kAhead % Cfg::kStages;  // slot of tile i + kAhead
  for (int i = 0; i < num_tiles; ++i) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async_shared();
    __syncthreads();
    if (i + kAhead < num_tiles) load_tile(tile_first + i + kAhead, load_stage);
    cp_async_commit();

    const int key0 = (tile_first + i) * Cfg::kTileKeys;
    const int key_last = key0 + Cfg::kTileKeys - 1;
    const uint32_t k_addr = ring_addr + stage * Cfg::kStageBytes;
    const uint32_t v_addr = k_addr + Cfg::kTileBytes;
    // Warpgroup-uniform: does any of its rows see a key of the tile (not past its last diagonal, not wholly
    // before its first row's window)? A mask is needed only where some row's range cuts the tile.
    const bool visible = wg_active && key0 <= wg_pos_hi && !(window > 0 && key_last < wg_pos_lo - window + 1);
    const bool needs_mask = key_last > wg_pos_lo || (window > 0 && key0 < wg_pos_hi - window + 1) ||
                            key0 < key_begin || key_last >= key_end;
    // Each branch below waits for every wgmma it issues before it ends: no wgmma is in flight across a
    // join of (to ptxas) divergent paths, which would make it serialize every wgmma of the kernel.
    float rescale[2];
    if (kPipelined && visible && p_pending) {
      issue_qk(k_addr);
      issue_pv(p_v_addr);   // the previous tile's P·V runs during this tile's softmax
      wgmma_wait<1>();      // Q·K^T, committed first, has landed
      softmax(key0, needs_mask, rescale);
      wgmma_wait<0>();
      pv_done();
      rescale_and_pack(rescale);
      p_v_addr = v_addr;    // p_pending stays
    } else if (visible) {
      issue_qk(k_addr);
      wgmma_wait<0>();
      softmax(key0, needs_mask, rescale);
      rescale_and_pack(rescale);
      if constexpr (kPipelined) {
        p_pending = true;
        p_v_addr = v_addr;
      } else {
        issue_pv(v_addr);
        wgmma_wait<0>();
        pv_done();
      }
    } else if (kPipelined && p_pending) {  // this tile hidden from the warpgroup: flush the previous P·V
      issue_pv(p_v_addr);
      wgmma_wait<0>();
      pv_done();
      p_pending = false;
    }
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
    load_stage = load_stage + 1 == Cfg::kStages ? 0 : load_stage + 1;
  }
  if (kPipelined && p_pending) {  // the last visible tile's P·V (its slot is never refilled)
    issue_pv(p_v_addr);
    wgmma_wait<0>();
    pv_done();
  }
  cp_async_wait<0>();

  // ---- normalize and write this thread's rows ------------------------------------------------------------
  if (!wg_active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = wg_row0 + 16 * wg_warp + g + 8 * h;
    if (r >= cta_rows) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* out = static_cast<T*>(p.out) + out_offset(r) + 2 * t;
#pragma unroll
    for (int d = 0; d < Cfg::kHalves; ++d) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        *reinterpret_cast<uint32_t*>(out + 64 * d + 8 * j) =
            pack_pair<T>(o[d][4 * j + 2 * h] * inv, o[d][4 * j + 2 * h + 1] * inv);
      }
    }
  }
#else
  __trap();  // built without sm_90a code: the launcher never routes here (wgmma_build_probe_kernel)
#endif
}

}  // namespace pagedinfer::attention
