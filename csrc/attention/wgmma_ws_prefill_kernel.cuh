// Paged attention for prompt chunks on sm_90a, warp-specialized and persistent (FlashAttention-3's shape;
// fp16/bf16, head_size 64 or 128). Same work items and semantics as the other prompt-chunk kernels (an item
// is a tile of 128 (token, head-of-group) rows of one (sequence, kv head), token-major; masks only where a
// row's range cuts a key tile; tiles no row sees skipped; invalid keys zero-filled; padded rows -> zeros):
//
//   * one CTA per SM (grid = min(items, SMs)) walks the items that exist round-robin, in units of two row
//     tiles of one (sequence, kv head) that cost about the same together (its last and its first, ...),
//     head after head, longest sequences first: the CTAs running at once share a few heads' K/V in L2, and
//     one item's loads overlap the previous item's last tiles and its output writes;
//   * warpgroup 0 only loads (an item's Q by TMA, one box per 64-column half issued by one thread, where
//     the item's rows start at a token's first head, else by cp.async; its 128 threads gather the K/V rows
//     of each 128-key tile from the paged cache by cp.async, each tile's K a tile before its V: a tile's
//     block ids are read a tile ahead, and its rows are addressed per block, a few instructions a copy: the
//     loader shares each scheduler with two consumer warps; TMA boxes of a block each were slower, 1 x
//     8,192 by 12-20 % on an H200), warpgroups 1 and 2 only compute, 64 rows each; they meet at mbarriers,
//     never at a CTA barrier:
//       q_full / q_empty [2]     a Q buffer (and its item's record) loaded / released by both consumers
//       k_full / k_empty [S]     a K slot loaded / read by both consumers' Q·K^T
//       v_full / v_empty [S]     a V slot loaded / read by both consumers' P·V
//     Loads complete the "full" barriers by cp.async.mbarrier.arrive (one arrival per producer thread, when
//     its copies land; a Q by TMA by its transaction bytes); each consumer warp arrives on "empty" once it
//     is done with the slot (8 arrivals).
//   * tiles of 128 keys: S = Q·K^T on wgmma m64n128k16 (head/16 k-steps), O += P·V on m64n{head}k16 (8
//     k-steps, P from registers, V MN-major; with kHalfTiles, a last visible tile whose keys 64.. no row of
//     the warpgroup sees takes m64n64 and 4 k-steps), the previous tile's P·V issued behind this tile's
//     Q·K^T so it runs during this tile's softmax (FlashAttention-3's intra-warpgroup overlap; see
//     qk_softmax_over_pv for what keeps ptxas from undoing it), and the two consumer warpgroups issuing
//     their MMAs in turns (FlashAttention-3's ping-pong); O is rescaled only when a row's reference maximum
//     moves, and it moves only by more than 2^8 (FlashAttention-4's lazy rescale); in the long prompts'
//     instantiation, tiles every row sees whole take no maximum at all: the exponentials run against the
//     reference, and the warpgroup redoes the tile with the maximum only where a P would pass 2^8;
//   * the register file is split by setmaxnreg: the loader keeps few, the consumers hold S, P and O
//     (64 + 32 + head/2 floats a thread);
//   * O leaves through 16 staging rows per consumer warp in shared memory (stmatrix, then whole 16-byte
//     chunks a lane): the accumulator layout would store 4-byte pieces of 8 rows at a time.
//
// Slot reuse follows the mbarrier phases: the producer waits for the phase of "empty" that frees the slot
// (parity flipped: a fresh barrier lets the first pass through), the consumers for the phase of "full"
// that filled it. A consumer warp arrives on a slot's "empty" only after waiting on its "full" (even for a
// tile it skips), so its arrival always counts toward the right phase.
//
// Shared memory: every operand in the 128-byte-swizzle canonical layout (rows of 64 elements = 128 B, atoms
// of 8 rows = 1 KB, 1 KB aligned, 16-byte chunk c of row r at chunk c ^ (r % 8): wgmma.cuh sw128_offset);
// a head of 128 is two "halves" (dims 0-63, 64-127), each its own region of rows. Descriptors
// (wgmma_desc_sw128), base offset 0:
//   Q, K (K-major): stride byte offset 1024 (from one 8-row atom to the next along M/N); leading byte
//     offset unused (one k-step's 32 bytes never leave a 128-byte row) and set to 16. k-step ks reads half
//     ks / 4 at start + 32 * (ks % 4) bytes: the hardware applies the swizzle to the address it forms, so
//     an in-atom start offset selects columns 16 (ks % 4) .. + 15.
//   V (MN-major): the 16 keys of a k-step are two 8-row atoms 1 KB apart (stride byte offset); the
//     64-wide halves of N are a tile-half apart (leading byte offset). k-step kk starts at kk * 2 KB.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>
#include <type_traits>

#include "attention/attention_params.cuh"
#include "attention/ptx.cuh"
#include "attention/wgmma.cuh"
#include "core/fast_divisor.cuh"

namespace pagedinfer::attention {

// What the loader tells the consumers about the item in a Q buffer (written before it fills q_full).
struct PrefillWork {
  int status;      // kComputeItem, kZeroItem (padded rows: write zeros) or kNoMoreItems
  int q_start;     // first query token of the sequence
  int row0;        // first (token, head) row of the item within the sequence's rows
  int cta_rows;    // rows of the item (<= 128)
  int kv_head;
  int context;     // tokens of the sequence before its new ones
  int key_begin;   // keys [key_begin, key_end) are loaded; others are zero-filled
  int key_end;
  int tile_first;  // first 128-key tile
  int num_tiles;
};
constexpr int kComputeItem = 0, kZeroItem = 1, kNoMoreItems = 2;

// The query as a TMA tensor map (made by the launcher, paged_attention.cu make_prefill_q_map): (columns,
// heads, tokens), a box of 64 columns x group heads x 128 / group tokens = one item's half, 128-byte swizzled
// (the layout of the kernel's Q buffers). ok = 0: no map (Q by cp.async).
struct PrefillQMap {
  CUtensorMap map;
  int ok;
};

template <typename T, int kHeadSize>
struct WsPrefillConfig {
  static_assert(kHeadSize == 64 || kHeadSize == 128, "the wgmma path is specialized for 64 and 128");
  static constexpr int kRows = 128;                  // rows per item: 2 consumer warpgroups x 64
  static constexpr int kThreads = 384;               // warpgroup 0 loads, 1 and 2 compute
  static constexpr int kConsumerWarps = 8;
  static constexpr int kTileKeys = 128;               // keys per tile: the N of S, the K of P·V
  static constexpr int kStages = kHeadSize == 128 ? 2 : 4;  // K/V ring slots (64-key tiles, 4 slots: slower)
  // The loaders list the items that exist (a sequence shorter than the longest has fewer row tiles; decodes
  // may run elsewhere) in shared memory when there are at most this many sequences and row tiles a sequence:
  // the sequences sorted by row tiles, and how many have more than r row tiles, for each r.
  static constexpr int kMaxListedSeqs = 2048;
  static constexpr int kMaxListedRowTiles = 1024;
  static constexpr int kListBytes = (kMaxListedSeqs + 2 * (kMaxListedRowTiles + 1) + 1) * 4;
  static constexpr int kQStages = 2;                 // the next item's Q loads while this one computes
  static constexpr int kHalves = kHeadSize / 64;     // 64-element (128-byte) column halves of a row
  static constexpr int kChunks = kHeadSize / 8;      // 16-byte chunks per row
  static constexpr int kRowBytes = 128;
  static constexpr int kTileHalfBytes = kTileKeys * kRowBytes;  // 16 KB
  static constexpr int kTileBytes = kHalves * kTileHalfBytes;   // K (or V) of one tile
  static constexpr int kQHalfBytes = kRows * kRowBytes;         // 16 KB
  static constexpr int kQBytes = kHalves * kQHalfBytes;
  static constexpr int kBarriers = 2 * kQStages + 4 * kStages;
  static constexpr int kRingBytes = kQStages * kQBytes + 2 * kStages * kTileBytes;
  // Each consumer warp stages 64 columns of its 16 output rows here on their way to global memory.
  static constexpr int kStagingWarpBytes = 16 * kRowBytes;
  static constexpr int kStagingBytes = kConsumerWarps * kStagingWarpBytes;  // 16 KB
  // + 1 KB: the dynamic shared memory base is aligned up to the 1 KB the swizzle atoms need.
  static constexpr int kRecordBytes = kQStages * int(sizeof(PrefillWork));
  static constexpr int kSmemBytes = kRingBytes + kStagingBytes + kBarriers * 8 + kRecordBytes + kListBytes +
                                    1024;  // 225 KB (head 128), 193 KB (64)
  static constexpr int kProducerRegs = 56;   // 128 x 56 + 256 x 224 <= 64 K registers
  static constexpr int kConsumerRegs = 224;
  static constexpr int kQPasses = kRows * kChunks / 128;       // 16-byte copies per loader thread
  static constexpr int kRowsPerPass = 128 / kChunks;           // K/V rows the loaders copy per pass
  static constexpr int kLoadPasses = kTileKeys / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0, "the swizzle must repeat from pass to pass");
};

// kBlockSize: 16 or 32 (compile time), or 0 (any block size). kHalfTiles: a warpgroup's last visible tile
// computes only its first 64 keys where no row of the warpgroup sees past them (the launcher picks it for
// short prompts). row_tiles: prefill_row_tiles(max_query_len, group, kRows); num_items = num_seqs *
// num_kv_heads * row_tiles; both from host ints (CUDA-graph safe).
template <typename T, int kHeadSize, int kBlockSize, bool kHalfTiles>
__global__ void __launch_bounds__(WsPrefillConfig<T, kHeadSize>::kThreads, 1)
    wgmma_ws_prefill_attention_kernel(const PagedAttentionParams p, const int row_tiles, const int num_items,
                                      const __grid_constant__ PrefillQMap q_map) {
#if PAGEDINFER_WGMMA
  using Cfg = WsPrefillConfig<T, kHeadSize>;
  constexpr int kKSteps = kHeadSize / 16;        // k-steps of Q·K^T
  constexpr int kPSteps = Cfg::kTileKeys / 16;   // k-steps of P·V
  constexpr int kSRegs = Cfg::kTileKeys / 2;     // S (then P) of one tile, per thread
  // A tile's keys the consumers compute: all, or the first half where no row of the warpgroup sees past it
  // (the diagonal tile: half of the items of 512-token prompts, 32 tokens x 4 heads an item, save half a tile).
  constexpr std::integral_constant<int, Cfg::kTileKeys> kWhole{};
  constexpr std::integral_constant<int, Cfg::kTileKeys / 2> kHalf{};
  constexpr int kORegs = kHeadSize / 2;          // O, per thread

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_address(smem_raw);
  unsigned char* smem = smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u);
  const uint32_t q_addr = smem_address(smem);                         // [kQStages][half][128 rows][64]
  const uint32_t k_addr = q_addr + Cfg::kQStages * Cfg::kQBytes;      // [kStages][half][128 keys][64]
  const uint32_t v_addr = k_addr + Cfg::kStages * Cfg::kTileBytes;    // [kStages][half][128 keys][64]
  const uint32_t staging_addr = v_addr + Cfg::kStages * Cfg::kTileBytes;  // [consumer warp][16 rows][64]
  const uint32_t bar_addr = staging_addr + Cfg::kStagingBytes;            // the mbarriers, 8 bytes each
  auto q_full = [&](int s) { return bar_addr + 8u * s; };
  auto q_empty = [&](int s) { return bar_addr + 8u * (Cfg::kQStages + s); };
  auto k_full = [&](int s) { return bar_addr + 8u * (2 * Cfg::kQStages + s); };
  auto k_empty = [&](int s) { return bar_addr + 8u * (2 * Cfg::kQStages + Cfg::kStages + s); };
  auto v_full = [&](int s) { return bar_addr + 8u * (2 * Cfg::kQStages + 2 * Cfg::kStages + s); };
  auto v_empty = [&](int s) { return bar_addr + 8u * (2 * Cfg::kQStages + 3 * Cfg::kStages + s); };
  unsigned char* const after_barriers = smem + Cfg::kRingBytes + Cfg::kStagingBytes + Cfg::kBarriers * 8;
  PrefillWork* records = reinterpret_cast<PrefillWork*>(after_barriers);
  int* sorted_seqs = reinterpret_cast<int*>(after_barriers + Cfg::kRecordBytes);
  int* seqs_above = sorted_seqs + Cfg::kMaxListedSeqs;       // [r]: sequences with more than r row tiles
  int* sort_cursor = seqs_above + Cfg::kMaxListedRowTiles + 1;  // counting sort by row tiles
  int* listed_items = sort_cursor + Cfg::kMaxListedRowTiles + 1;  // the items of the listed sequences

  if (threadIdx.x == 0) {
    for (int s = 0; s < Cfg::kQStages; ++s) {
      // Every loader thread when its Q copies land, and loader thread 0 once more right after it wrote
      // the record (a plain arrival releases those stores; an arrival on cp.async completion may not).
      mbarrier_init(q_full(s), 129);
      mbarrier_init(q_empty(s), Cfg::kConsumerWarps);
    }
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(k_full(s), 128);
      mbarrier_init(k_empty(s), Cfg::kConsumerWarps);
      mbarrier_init(v_full(s), 128);
      mbarrier_init(v_empty(s), Cfg::kConsumerWarps);
    }
  }
  __syncthreads();

  const int group = p.num_heads / p.num_kv_heads;
  const int window = p.sliding_window;

  if (threadIdx.x < 128) {
    // ======== loader warpgroup ==============================================================================
    warpgroup_release_registers<Cfg::kProducerRegs>();
    const int lt = threadIdx.x;
    const int table_keys = p.max_blocks_per_seq * p.block_size;
    const int block_size = kBlockSize > 0 ? kBlockSize : p.block_size;
    const T* kv = static_cast<const T*>(p.kv_cache);
    const int64_t token_stride = int64_t(p.num_kv_heads) * kHeadSize;
    const uint32_t block_elems = uint32_t(token_stride) * block_size;   // a block's first row to the next's
    const int64_t pass_stride = token_stride * Cfg::kRowsPerPass;       // one pass's rows to the next's
    const bool q_aligned = reinterpret_cast<uintptr_t>(p.query) % 16 == 0 && p.q_row_stride % 8 == 0;
    const int ld_row = lt / Cfg::kChunks, ld_chunk = lt % Cfg::kChunks;
    const int q_head_step = Cfg::kRowsPerPass % group;
    const int64_t q_pass_step = int64_t(Cfg::kRowsPerPass / group) * p.q_row_stride + int64_t(q_head_step) * kHeadSize;
    const int64_t q_wrap_step = p.q_row_stride - int64_t(group) * kHeadSize;
    // Where this thread's 16 bytes of pass 0 land in a Q buffer or K/V slot (the same layout: 128 rows).
    static_assert(Cfg::kQHalfBytes == Cfg::kTileHalfBytes, "Q and K/V tiles share one layout");
    const uint32_t ld_dst = sw128_offset(ld_row, ld_chunk, Cfg::kTileHalfBytes);
    // Row tiles of a sequence this kernel serves (0: none).
    auto row_tiles_of = [&](int seq) {
      const int q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
      if (q_len <= 0 || (p.decodes_elsewhere && q_len == 1)) return 0;
      const int tiles = (q_len * group + Cfg::kRows - 1) / Cfg::kRows;
      return tiles < row_tiles ? tiles : row_tiles;
    };
    auto loader_sync = [] { asm volatile("bar.sync 1, 128;\n" ::: "memory"); };
    // The sequences that have items, by row tiles, descending (ties in sequence order), listed once by a
    // counting sort: dense, so that the round-robin walk below gives every CTA its share of the real work.
    // Otherwise (more sequences or row tiles than listed) every (level, sequence, kv head) is walked, the
    // sequences' last row tiles first, and the absent ones skipped.
    const bool listed = p.num_seqs <= Cfg::kMaxListedSeqs && row_tiles <= Cfg::kMaxListedRowTiles;
    if (listed) {
      for (int r = lt; r <= row_tiles; r += 128) sort_cursor[r] = 0;
      loader_sync();
      for (int seq = lt; seq < p.num_seqs; seq += 128) atomicAdd(&sort_cursor[row_tiles_of(seq)], 1);
      loader_sync();
      if (lt == 0) {  // histogram -> start of each count's run in the sorted list, and seqs_above
        int above = 0, items = 0;
        for (int r = row_tiles; r >= 1; --r) {
          const int n = sort_cursor[r];
          sort_cursor[r] = above;
          above += n;
          seqs_above[r - 1] = above;
          items += above;
        }
        seqs_above[row_tiles] = 0;
        *listed_items = items * p.num_kv_heads;
      }
      loader_sync();
      // Placed in sequence order within each count (a stable sort), by one warp: every CTA walks its own
      // copy of the list, so every copy must be the same. (Placed by atomics, the order followed warp
      // timing: under another kernel's load CTAs disagreed, and whole items ran twice or never.)
      if (lt < 32) {
        constexpr int kBatch = 8;  // 8 x 32 sequences' lengths loaded at once: one memory latency
        for (int base = 0; base < p.num_seqs; base += 32 * kBatch) {
          int tiles[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int seq = base + 32 * u + lt;
            tiles[u] = seq < p.num_seqs ? row_tiles_of(seq) : 0;
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const unsigned same = __match_any_sync(0xffffffffu, tiles[u]);  // the lanes with this count
            const int rank = __popc(same & ((1u << lt) - 1u));
            const int start = sort_cursor[tiles[u]];
            __syncwarp();
            if (tiles[u] > 0) {
              sorted_seqs[start + rank] = base + 32 * u + lt;
              if (rank == 0) sort_cursor[tiles[u]] = start + __popc(same);
            }
            __syncwarp();
          }
        }
      }
      loader_sync();
    }
    int q_slot = 0, stage = 0;
    uint32_t q_phase = 0, phase = 0;
    // The listed walk goes by units: row tiles L - 1 - u and u of one (sequence, kv head) of L row tiles, run
    // back to back by one CTA. Units of a sequence cost about the same (L + 1 row tiles' keys), so the
    // round-robin gives every CTA its share; they go (sequence, kv head) after (sequence, kv head), longest
    // sequences first, so the CTAs running at once read the K/V of a few heads and find it in L2. (Walked by
    // row tile levels across all heads, 1 x 8,192 read 208 MB from DRAM, cuDNN 101, and 8 x 512 over 4,096
    // read 1.18 GB, on an H200.) With no more items than CTAs a unit is one row tile: no CTA runs two.
    const bool fold = listed && *listed_items > int(gridDim.x);
    auto units_per_head = [&](int tiles) { return fold ? (tiles + 1) / 2 : tiles; };
    int run_tiles = row_tiles + 1;                  // the run of sequences walked: those of run_tiles row tiles
    int run_begin = 0, run_end = 0, run_rank0 = 0;  // its units, and its first sequence's place in the list
    int unit = int(blockIdx.x) - int(gridDim.x), pending_tile = -1;  // pending: the unit's second row tile
    int row_tile = 0, seq = 0, kv_head = 0;
    for (int item = blockIdx.x;; item += gridDim.x) {  // item: the unlisted walk's
      if (listed && pending_tile >= 0) {
        row_tile = pending_tile;
        pending_tile = -1;
      } else if (listed) {
        unit += gridDim.x;
        while (unit >= run_end && run_tiles > 1) {
          --run_tiles;
          run_begin = run_end;
          run_rank0 = seqs_above[run_tiles];
          run_end += (seqs_above[run_tiles - 1] - run_rank0) * p.num_kv_heads * units_per_head(run_tiles);
        }
        if (unit >= run_end) break;
        const int per_head = units_per_head(run_tiles);
        const int head_index = (unit - run_begin) / per_head;  // (sequence, kv head) within the run
        const int u = unit - run_begin - head_index * per_head;
        seq = sorted_seqs[run_rank0 + head_index / p.num_kv_heads];
        kv_head = head_index % p.num_kv_heads;
        row_tile = run_tiles - 1 - u;
        if (fold && u < row_tile) pending_tile = u;
      } else {
        if (item >= num_items) break;
        const int items_per_level = p.num_seqs * p.num_kv_heads;
        row_tile = row_tiles - 1 - item / items_per_level;
        seq = item % items_per_level / p.num_kv_heads;
        kv_head = item % p.num_kv_heads;
        if (row_tile >= row_tiles_of(seq)) continue;  // no such rows
      }
      const int q_start = p.query_start_loc[seq];
      const int q_len = p.query_start_loc[seq + 1] - q_start;
      const int seq_len = p.seq_lens[seq];
      const int row0 = row_tile * Cfg::kRows;
      PrefillWork w;
      w.status = seq_len > 0 ? kComputeItem : kZeroItem;
      w.q_start = q_start;
      w.row0 = row0;
      w.cta_rows = q_len * group - row0 < Cfg::kRows ? q_len * group - row0 : Cfg::kRows;
      w.kv_head = kv_head;
      w.context = seq_len - q_len;
      const int pos_lo = w.context + row0 / group;
      const int pos_hi = w.context + (row0 + w.cta_rows - 1) / group;
      w.key_begin = window > 0 && pos_lo - window + 1 > 0 ? pos_lo - window + 1 : 0;
      w.key_end = pos_hi + 1 < table_keys ? pos_hi + 1 : table_keys;
      w.tile_first = w.key_begin / Cfg::kTileKeys;
      w.num_tiles = seq_len > 0 && w.key_end > w.key_begin
                        ? (w.key_end + Cfg::kTileKeys - 1) / Cfg::kTileKeys - w.tile_first
                        : 0;

      const int32_t* block_table = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
      // This thread's 16 bytes of its first row: head, chunk, and row ld_row of a block.
      const T* src_base = kv + int64_t(kv_head) * kHeadSize + ld_chunk * 8 + (kBlockSize > 0 ? ld_row : 0) * token_stride;
      // With a compile-time block size a tile spans kTileBlocks whole blocks: lane b of each loader warp
      // reads block b's id once per tile and the warp's lanes take theirs by shuffle (no dependent global
      // load per row). Table columns past the end are never read (their keys are invalid).
      constexpr int kTileBlocks = kBlockSize > 0 ? Cfg::kTileKeys / kBlockSize : 1;
      static_assert(Cfg::kTileKeys % (kBlockSize > 0 ? kBlockSize : 1) == 0 && kTileBlocks <= 32, "whole blocks");
      const int lane = lt % 32;
      auto tile_block_ids = [&](int tile) {
        const int block = tile * kTileBlocks + lane;
        return kBlockSize > 0 && lane < kTileBlocks && block < p.max_blocks_per_seq ? block_table[block] : 0;
      };
      // The block ids of the next tile to load, read a tile ahead (and the first tile's before Q) so that
      // the table's latency hides behind other copies instead of standing before each tile's.
      int next_block_ids = w.num_tiles > 0 ? tile_block_ids(w.tile_first) : 0;

      // ---- Q and the record, in Q buffer q_slot (rows past cta_rows: zeros by cp.async; by TMA the next
      // tokens' rows, or zeros past the tensor: every key of those rows is masked and they are never
      // written) ----
      mbarrier_wait(q_empty(q_slot), q_phase ^ 1u);
      const bool q_by_tma = q_map.ok && w.num_tiles > 0;
      if (lt == 0) {
        records[q_slot] = w;
        if (q_by_tma) {
          mbarrier_arrive_expect_tx(q_full(q_slot), Cfg::kQBytes);  // also releases the record
#pragma unroll
          for (int hf = 0; hf < Cfg::kHalves; ++hf) {
            tma_load_3d(q_addr + q_slot * Cfg::kQBytes + hf * Cfg::kQHalfBytes, &q_map.map, 64 * hf,
                        kv_head * group, q_start + row0 / group, q_full(q_slot));
          }
        } else {
          mbarrier_arrive(q_full(q_slot));
        }
      }
      if (q_by_tma) {
        mbarrier_arrive(q_full(q_slot));
      } else if (w.num_tiles > 0) {
        const T* query = static_cast<const T*>(p.query);
        // Row r = ld_row + pass * kRowsPerPass is (token, head) = (fr / group, fr % group), fr = row0 + r:
        // one division per item, then the source steps kRowsPerPass rows a pass (q_pass_step, and
        // q_wrap_step more when the head wraps into the next token).
        const int fr = row0 + ld_row, first_token = fr / group;
        int q_head = fr - first_token * group;
        const T* q_src = query + int64_t(q_start + first_token) * p.q_row_stride +
                         int64_t(kv_head * group + q_head) * kHeadSize + ld_chunk * 8;
        const uint32_t q_dst = q_addr + q_slot * Cfg::kQBytes + ld_dst;
        // copy(dst, src, valid) for each of this thread's rows; the alignment test stays outside the loop.
        auto for_each_q_row = [&](auto copy) {
#pragma unroll 4
          for (int pass = 0; pass < Cfg::kQPasses; ++pass) {
            const bool valid = ld_row + pass * Cfg::kRowsPerPass < w.cta_rows;
            copy(q_dst + pass * Cfg::kRowsPerPass * Cfg::kRowBytes, valid ? q_src : query, valid);
            q_src += q_pass_step;
            q_head += q_head_step;
            if (q_head >= group) {
              q_head -= group;
              q_src += q_wrap_step;
            }
          }
        };
        if (q_aligned) {
          for_each_q_row([](uint32_t dst, const T* src, bool valid) { cp_async_16(dst, src, valid); });
          mbarrier_arrive_on_cp_async(q_full(q_slot));
        } else {  // a query view not 16-byte aligned: 2-byte loads, plain stores
          for_each_q_row([&](uint32_t dst, const T* src, bool valid) {
            const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
            uint32_t v[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = valid ? uint32_t(s16[2 * i]) | (uint32_t(s16[2 * i + 1]) << 16) : 0u;
            *reinterpret_cast<uint4*>(smem + (dst - q_addr)) = make_uint4(v[0], v[1], v[2], v[3]);
          });
          fence_proxy_async_shared();  // plain stores -> wgmma's reads
          mbarrier_arrive(q_full(q_slot));
        }
      } else {
        mbarrier_arrive(q_full(q_slot));
      }
      if (++q_slot == Cfg::kQStages) { q_slot = 0; q_phase ^= 1u; }

      // ---- K and V of each tile into the ring; keys outside [key_begin, key_end) zero-filled (src-size 0):
      // stale cache rows may hold NaN ----
      // One tile's K (or V) rows into a ring slot: pass `pass` copies row ld_row + pass * kRowsPerPass of the
      // tile. With a compile-time block size the rows of a block are token_stride apart from its first, so
      // a block costs one shuffle and one multiply; only the tiles that cut [key_begin, key_end) check keys.
      auto load_rows = [&](int tile, int block_ids, uint32_t slot_addr, int64_t part_offset) {
        const int key0 = tile * Cfg::kTileKeys;
        const bool whole = key0 >= w.key_begin && key0 + Cfg::kTileKeys <= w.key_end;
        const T* base = src_base + part_offset;
        auto copy = [&](int pass, const T* src, bool valid) {
          cp_async_16(slot_addr + ld_dst + pass * Cfg::kRowsPerPass * Cfg::kRowBytes, valid ? src : base, valid);
        };
        if constexpr (kBlockSize > 0) {
          constexpr int kPassesPerBlock = kBlockSize / Cfg::kRowsPerPass;
          static_assert(kBlockSize % Cfg::kRowsPerPass == 0, "a pass stays inside one block");
          auto block_src = [&](int b) {  // block ids are >= 0 and a block's elements fit 32 bits: one IMAD.WIDE
            return base + uint64_t(uint32_t(__shfl_sync(0xffffffffu, block_ids, b))) * block_elems;
          };
          // Edge tiles check each row's key: one unsigned compare against the visible range.
          const uint32_t first_key = uint32_t(key0 + ld_row - w.key_begin), visible_keys = w.key_end - w.key_begin;
          auto copy_blocks = [&](auto edge) {
#pragma unroll
            for (int b = 0; b < kTileBlocks; ++b) {
              const T* src = block_src(b);
#pragma unroll
              for (int k = 0; k < kPassesPerBlock; ++k) {
                const int pass = b * kPassesPerBlock + k;
                const bool valid = !decltype(edge)::value || first_key + pass * Cfg::kRowsPerPass < visible_keys;
                copy(pass, src + k * pass_stride, valid);
              }
            }
          };
          if (whole) copy_blocks(std::false_type{});
          else copy_blocks(std::true_type{});
        } else {
#pragma unroll 4
          for (int pass = 0; pass < Cfg::kLoadPasses; ++pass) {
            const int key = key0 + ld_row + pass * Cfg::kRowsPerPass;
            const bool valid = key >= w.key_begin && key < w.key_end;
            copy(pass, valid ? base + kv_row_offset(block_table, key, block_size, token_stride, 0) : base, valid);
          }
        }
      };
      // K runs a tile ahead of V: the consumers free a K slot at its tile's Q·K^T but a V slot only after its
      // P·V (issued behind the next tile's Q·K^T, waited for after that tile's softmax), so a loader that
      // waited for V's slot before the next K would hold that K back by a tile.
      // One pass more than there are tiles: the last V goes in on it, so each load keeps one call site (each
      // is unrolled per block; a V after the loop would be a third copy of that code).
      int v_block_ids = 0, v_stage = 0;  // the previous tile's: its V goes in after this tile's K
      uint32_t v_phase = 0;
      for (int i = 0; i <= w.num_tiles; ++i) {
        const int tile = w.tile_first + i;
        const int block_ids = next_block_ids;
        if (i < w.num_tiles) {
          if (i + 1 < w.num_tiles) next_block_ids = tile_block_ids(tile + 1);
          mbarrier_wait(k_empty(stage), phase ^ 1u);
          load_rows(tile, block_ids, k_addr + stage * Cfg::kTileBytes, 0);
          mbarrier_arrive_on_cp_async(k_full(stage));
        }
        if (i > 0) {
          mbarrier_wait(v_empty(v_stage), v_phase ^ 1u);
          load_rows(tile - 1, v_block_ids, v_addr + v_stage * Cfg::kTileBytes, p.v_offset);
          mbarrier_arrive_on_cp_async(v_full(v_stage));
        }
        if (i < w.num_tiles) {
          v_block_ids = block_ids;
          v_stage = stage;
          v_phase = phase;
          if (++stage == Cfg::kStages) { stage = 0; phase ^= 1u; }
        }
      }
    }
    mbarrier_wait(q_empty(q_slot), q_phase ^ 1u);
    if (lt == 0) {
      records[q_slot].status = kNoMoreItems;
      mbarrier_arrive(q_full(q_slot));
    }
    mbarrier_arrive(q_full(q_slot));
    return;
  }

  // ======== consumer warpgroups ===============================================================================
  warpgroup_claim_registers<Cfg::kConsumerRegs>();
  const int wg = threadIdx.x / 128 - 1;          // consumer warpgroup: rows 64 wg .. 64 wg + 63
  const int ct = threadIdx.x - 128;              // consumer thread 0 .. 255
  const int lane = threadIdx.x % 32;
  const int wg_warp = (threadIdx.x / 32) % 4;    // warp within the warpgroup: its 16 rows
  const int g = lane / 4, t = lane % 4;          // accumulator fragment coordinates
  const int wg_row0 = wg * 64;
  // Four rows on, as (tokens, heads): the epilogue steps its rows without a division.
  const int four_rows_tokens = 4 / group, four_rows_heads = 4 % group;
  // Rows -> tokens without an integer division (a few per item: row ranges, each row's keys, the output
  // rows): on an H200 16 x 512 prompts ran 3 % faster with it and the rcp.approx below.
  const FastDivisor group_divisor(group);
  constexpr float kRescaleSlackLog2 = 8.f;
  const float rescale_slack = kRescaleSlackLog2 / p.scale_log2;  // in raw score units
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbarrier_arrive(bar);
  };

  // Ping-pong (FlashAttention-3's): the two consumer warpgroups take turns issuing their tile's MMAs, so
  // that one's softmax runs while the other's MMAs hold the tensor cores. Named barrier 2 + wg is this
  // warpgroup's turn, opened by the other's arrival; both take one turn per tile, visible or not, so the
  // turns alternate to the end. Warpgroup 1 opens the first turn, warpgroup 0 takes the last one at exit.
  auto wait_turn = [&] { asm volatile("bar.sync %0, 256;\n" ::"r"(2 + wg) : "memory"); };
  auto pass_turn = [&] { asm volatile("bar.arrive %0, 256;\n" ::"r"(3 - wg) : "memory"); };
  if (wg == 1) pass_turn();

  int q_slot = 0, stage = 0;
  uint32_t q_phase = 0, phase = 0;
  for (;;) {
    mbarrier_wait(q_full(q_slot), q_phase);
    const PrefillWork w = records[q_slot];
    if (w.status == kNoMoreItems) break;
    const uint32_t q_wg_addr = q_addr + q_slot * Cfg::kQBytes + wg_row0 * Cfg::kRowBytes;
    const int this_q_slot = q_slot;
    if (++q_slot == Cfg::kQStages) { q_slot = 0; q_phase ^= 1u; }
    auto out_offset = [&](int r) -> int64_t {
      const int fr = w.row0 + r;
      return (int64_t(w.q_start + fr / group) * p.num_heads + w.kv_head * group + fr % group) * kHeadSize;
    };
    if (w.status == kZeroItem) {  // padded rows: zeros
      release(q_empty(this_q_slot));
      constexpr int kVecs = kHeadSize / 8;
      for (int i = ct; i < w.cta_rows * kVecs; i += 256) {
        T* o = static_cast<T*>(p.out) + out_offset(i / kVecs) + (i % kVecs) * 8;
        *reinterpret_cast<uint4*>(o) = make_uint4(0u, 0u, 0u, 0u);
      }
      continue;
    }
    fence_proxy_async_shared();  // Q's cp.async writes (generic proxy) -> wgmma's reads (async proxy)

    const bool wg_active = wg_row0 < w.cta_rows;
    const int wg_last = (wg_row0 + 64 < w.cta_rows ? wg_row0 + 64 : w.cta_rows) - 1;
    const int wg_pos_lo = w.context + group_divisor.div(w.row0 + wg_row0);
    const int wg_pos_hi = w.context + group_divisor.div(w.row0 + wg_last);
    // The keys this thread's rows g and g + 8 of its warp see: (key_lo, key_hi]. Past cta_rows none
    // (key_hi -1; those rows are never written); none at or past key_end (where the keys are zero-filled).
    int key_lo[2], key_hi[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wg_row0 + 16 * wg_warp + g + 8 * h;
      const int pos = w.context + group_divisor.div(w.row0 + r);
      key_hi[h] = r >= w.cta_rows ? -1 : pos < w.key_end ? pos : w.key_end - 1;
      key_lo[h] = window > 0 ? key_hi[h] - window : -1;
    }

    float o[kORegs];  // not zeroed: the item's first P·V writes it (scale-d 0), later ones add
    bool o_fresh = true;  // no P·V has written O yet this item
    float row_max[2] = {-INFINITY, -INFINITY};  // running reference (raw scores; <= the max, see softmax)
    float row_sum[2] = {0.f, 0.f};              // this thread's share of the running sums
    float s[kSRegs];                            // S, then P, of the current tile (accumulator layout)
    uint32_t pa[kPSteps][4];                    // P as A fragments, one per k-step of P·V
    bool p_pending = false;                     // P of the previous visible tile waits in pa for its P·V
    bool p_half = false;                        // ... of a half tile: keys 0 .. 63 only (pa[0 .. 3])
    int pv_stage = 0;
    uint32_t pv_phase = 0;

    // Descriptors: one run each (WgmmaDescRun), made at every issue, so that no k-step's descriptor holds
    // registers across the loop (the softmax needs them).
    // `cols` (compile time): the tile's first kWhole (all) or kHalf keys; a half tile fills
    // s[0 .. kHalf / 2 - 1] (the accumulator layout of the first n-blocks is the same at either width).
    auto issue_qk = [&](auto cols, int st) {
      constexpr int kCols = decltype(cols)::value;
      float(&acc)[kCols / 2] = *reinterpret_cast<float(*)[kCols / 2]>(&s[0]);
      const WgmmaDescRun q_run(q_wg_addr, 16, 1024), k_run(k_addr + st * Cfg::kTileBytes, 16, 1024);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const uint32_t in_row = uint32_t(ks & 3) * 32u;  // bytes into the 128-byte rows: columns 16 (ks % 4) ..
        const uint64_t da = q_run.at((ks >> 2) * Cfg::kQHalfBytes + in_row);
        const uint64_t db = k_run.at((ks >> 2) * Cfg::kTileHalfBytes + in_row);
        if (ks == 0) Wgmma<T, kCols>::ss_first(acc, da, db);
        else Wgmma<T, kCols>::ss(acc, da, db);
      }
      wgmma_commit();
    };
    // V MN-major: 8-key atoms 1 KB apart (stride byte offset), 64-dim halves a tile-half apart (leading).
    // The first cols / 16 k-steps (keys 0 .. cols - 1).
    auto issue_pv = [&](auto cols, int st) {
      const WgmmaDescRun v_run(v_addr + st * Cfg::kTileBytes, Cfg::kTileHalfBytes, 1024);
#pragma unroll
      for (int i = 0; i < kORegs; ++i) wgmma_fence_operand(o[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < decltype(cols)::value / 16; ++kk) {
        const uint64_t dv = v_run.at(kk * 16 * Cfg::kRowBytes);
        Wgmma<T, kHeadSize>::rs_tn(o, pa[kk], dv, kk == 0 ? int(!o_fresh) : 1);
      }
      wgmma_commit();
      o_fresh = false;
    };
    auto pv_done = [&]() {
#pragma unroll
      for (int i = 0; i < kORegs; ++i) wgmma_fence_operand(o[i]);
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) wgmma_fence_operand(pa[kk][i]);
      }
    };
    // Row half h (rows g, g + 8) of the tile's first `cols` keys: S -> P = exp2(S * scale_log2 - ref), and
    // this thread's sum of them, in 4 independent chains (one chain is 32 dependent instructions, and two
    // warps a scheduler leave its latency bare; each starts from its first pair: 0 + x is not folded away).
    auto exp_and_sum = [&](auto cols, int h, float ref) {
      constexpr int kBlocks = decltype(cols)::value / 8;  // n-blocks of 8 keys: s[4 j .. 4 j + 3]
      constexpr int kChains = 4;
      float chain_sum[kChains];
#pragma unroll
      for (int j = 0; j < kBlocks; ++j) {
        s[4 * j + 2 * h] = fast_exp2(fmaf(s[4 * j + 2 * h], p.scale_log2, -ref));
        s[4 * j + 2 * h + 1] = fast_exp2(fmaf(s[4 * j + 2 * h + 1], p.scale_log2, -ref));
        const float pair_sum = s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
        chain_sum[j % kChains] = j < kChains ? pair_sum : chain_sum[j % kChains] + pair_sum;
      }
      return (chain_sum[0] + chain_sum[1]) + (chain_sum[2] + chain_sum[3]);
    };
    // Mask and online softmax of S (landed) for keys key0 ..: s becomes P (unnormalized), row_max and
    // row_sum advance; O's rescale factors are returned, not applied (a P·V may still be writing O).
    // A reference moves where the tile's maximum passes it by more than `slack` (raw score units).
    // kMasked is a compile-time constant, and the mask is selects, no branch: this runs while a P·V is in
    // flight, and a branch that joins there makes ptxas wait for that P·V first (no overlap left).
    auto softmax = [&](auto masked, auto cols, int key0, float (&rescale)[2], float slack) {
      constexpr bool kMasked = decltype(masked)::value;
      constexpr int kBlocks = decltype(cols)::value / 8;  // n-blocks of 8 keys: s[4 j .. 4 j + 3]
#pragma unroll
      for (int i = 0; i < 4 * kBlocks; ++i) wgmma_fence_operand(s[i]);
      if constexpr (kMasked) {
#pragma unroll
        for (int j = 0; j < kBlocks; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + 8 * j + 2 * t + (e & 1);
            s[4 * j + e] = key > key_hi[e / 2] || key <= key_lo[e / 2] ? -INFINITY : s[4 * j + e];
          }
        }
      }
      // The row's 4 threads (a quad) hold its 128 scores, 32 each (64, 16 of a half tile). Maxima in kChains
      // independent chains, as exp_and_sum's sums.
      constexpr int kChains = 4;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Each chain starts from its first pair (fmaxf(-inf, x) is not folded away).
        float chain_max[kChains];
#pragma unroll
        for (int j = 0; j < kBlocks; ++j) {
          const float pair_max = fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]);
          chain_max[j % kChains] = j < kChains ? pair_max : fmaxf(chain_max[j % kChains], pair_max);
        }
        float tile_max = fmaxf(fmaxf(chain_max[0], chain_max[1]), fmaxf(chain_max[2], chain_max[3]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        // With slack rescale_slack (FlashAttention-4's lazy rescale) P stays <= 2^kRescaleSlackLog2, which
        // bf16, fp16 and the fp32 sums hold with room, and O's rescale (a multiply of the whole accumulator)
        // is mostly skipped.
        const float new_max = tile_max > row_max[h] + slack ? tile_max : row_max[h];
        // A row with no visible key yet keeps max -inf; subtracting 0 then keeps every exp2 at 0, not NaN.
        const float ref = new_max == -INFINITY ? 0.f : new_max * p.scale_log2;
        rescale[h] = row_max[h] == new_max ? 1.f : fast_exp2(row_max[h] * p.scale_log2 - ref);
        row_max[h] = new_max;
        row_sum[h] = row_sum[h] * rescale[h] + exp_and_sum(cols, h, ref);
      }
    };
    // The steady state's softmax, without the maximum: S -> P against the rows' current references, and
    // this thread's share of each row's tile sum. A P is at most the share it is part of, so shares of at
    // most 2^kRescaleSlackLog2 tell what the maximum's test would (no reference moves; a score past the
    // reference by 128 or more in log2 units makes its share infinite). The maximum's 66 FMNMX and 4
    // shuffles stood between the Q·K^T and the first exponential.
    auto exp_at_reference = [&](float (&tile_sum)[2]) {
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) wgmma_fence_operand(s[i]);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // A row with no reference yet (max -inf) gets +inf exponents: its share is infinite, and it redoes.
        tile_sum[h] = exp_and_sum(kWhole, h, row_max[h] * p.scale_log2);
      }
    };
    // Does any row of this warp move its reference (O to rescale)? With the lazy rescale, rarely.
    auto any_rescale = [&](const float (&rescale)[2]) {
      return __any_sync(0xffffffffu, rescale[0] != 1.f || rescale[1] != 1.f);
    };
    auto rescale_o = [&](const float (&rescale)[2]) {
#pragma unroll
      for (int j = 0; j < kORegs / 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * j + e] *= rescale[e / 2];
      }
    };
    // P -> pa: accumulator n-blocks 2kk (keys 16kk + 0..7) and 2kk + 1 (+8..15) are the A-fragment layout
    // with those keys as K.
    auto pack_p = [&](auto cols) {
#pragma unroll
      for (int kk = 0; kk < decltype(cols)::value / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[kk][i] = pack_pair<T>(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
      }
    };
    auto flush_pending_pv = [&]() {
      mbarrier_wait(v_full(pv_stage), pv_phase);
      fence_proxy_async_shared();
      if (p_half) {
        issue_pv(kHalf, pv_stage);
        wgmma_wait<0>();
      } else {
        issue_pv(kWhole, pv_stage);
        wgmma_wait<0>();
      }
      pv_done();
      release(v_empty(pv_stage));
      p_pending = false;
      p_half = false;
    };

    // ---- the tiles: each branch waits for every wgmma it issues before it ends (a wgmma in flight across
    // a join of divergent paths makes ptxas serialize every wgmma of the kernel) ----
    // Tiles steady_lo .. steady_hi: every row of the warpgroup sees each of their keys (no mask, whole tiles);
    // the steady-state branch below takes them.
    const int steady_key0 = max(w.key_begin, window > 0 ? wg_pos_hi - window + 1 : 0);
    const int steady_lo = (steady_key0 + Cfg::kTileKeys - 1) / Cfg::kTileKeys - w.tile_first;
    const int steady_hi = wg_active ? min(wg_pos_lo + 1, w.key_end) / Cfg::kTileKeys - 1 - w.tile_first : -1;
    for (int i = 0; i < w.num_tiles; ++i) {
      const int key0 = (w.tile_first + i) * Cfg::kTileKeys;
      float rescale[2];
      // Q·K^T, then the softmax; with a P waiting, its P·V issued behind the Q·K^T runs during the softmax
      // (FlashAttention-3's intra-warpgroup overlap). ptxas makes a branch that joins with a wgmma in flight
      // wait for it at the join, so the only branch between issue and wait is the one placed for that.
      auto qk_softmax = [&](auto masked, auto cols) {
        wait_turn();
        issue_qk(cols, stage);
        pass_turn();
        wgmma_wait<0>();
        release(k_empty(stage));
        softmax(masked, cols, key0, rescale, rescale_slack);
        // No rescale of O: with no P pending this is the warpgroup's first visible tile (its visible tiles
        // are consecutive, and a flush comes only after the last), so no P·V has written O yet.
      };
      auto qk_softmax_over_pv = [&](auto masked, auto cols) {  // the pending P is a whole tile's
        wait_turn();
        issue_qk(cols, stage);
        issue_pv(kWhole, pv_stage);
        pass_turn();
        wgmma_wait<1>();  // Q·K^T, committed first, has landed
        release(k_empty(stage));
        softmax(masked, cols, key0, rescale, rescale_slack);
        // The rescale vote's branch closes the softmax's basic block and joins where the P·V wait belongs.
        // Without it ptxas hoists the wait into the softmax's block, ~40 instructions after the Q·K^T wait,
        // and the exponentials wait for the P·V they were meant to overlap.
        if (any_rescale(rescale)) {
          wgmma_wait<0>();
          pv_done();
          rescale_o(rescale);
        }
        wgmma_wait<0>();
      };
      // The steady state's Q·K^T and softmax: exponentials at once, no maximum. Where a share passes
      // 2^kRescaleSlackLog2 (a reference must move, or a row has none yet) the warpgroup computes S again
      // from K (its slot is released only after the vote) and takes the full softmax. The vote is the
      // warpgroup's (named barrier 4 + wg): a wgmma is issued by all four of its warps or by none.
      auto qk_exp_over_pv = [&]() {
        wait_turn();
        issue_qk(kWhole, stage);
        issue_pv(kWhole, pv_stage);
        pass_turn();
        wgmma_wait<1>();  // Q·K^T, committed first, has landed
        float tile_sum[2];
        exp_at_reference(tile_sum);
        constexpr float kShareCap = float(1 << int(kRescaleSlackLog2));
        const bool redo = !(tile_sum[0] <= kShareCap && tile_sum[1] <= kShareCap);
        const bool redo_any = barrier_any<128>(4 + wg, redo);
        wgmma_wait<0>();  // the P·V
        // Nothing in flight past here: a wgmma issued in a branch that joins with another in flight
        // serializes every wgmma of the kernel (ptxas C7515).
        if (redo_any) {
          pv_done();
          issue_qk(kWhole, stage);
          wgmma_wait<0>();
          // Slack 0: each reference moves to its row's maximum so far. With the lazy slack a row whose
          // scores sit a few log2 units over its reference, never 8, would pass the share every tile and
          // redo every tile; from the maximum, the next redo needs a score past it by ~3.
          softmax(std::false_type{}, kWhole, key0, rescale, 0.f);
          if (any_rescale(rescale)) rescale_o(rescale);
        } else {
          row_sum[0] += tile_sum[0];
          row_sum[1] += tile_sum[1];
        }
        release(k_empty(stage));
      };
      // The steady state, first and apart: a whole unmasked tile after a visible one (P pending, a whole
      // tile's: a half tile is the warpgroup's last visible), without the checks below, with one proxy
      // fence for K and V, and with the softmax that skips the maximum. Most tiles of a long prompt are
      // such: on an H200 the branch took 1 x 8,192 tokens 2-3 % faster, and the softmax without the
      // maximum 8 % more. Only in the long prompts' instantiation (no half tiles), so that the short
      // prompts' one stays the code that was measured (its items have a few tiles each).
      if (!kHalfTiles && p_pending && i >= steady_lo && i <= steady_hi) {
        mbarrier_wait(k_full(stage), phase);
        mbarrier_wait(v_full(pv_stage), pv_phase);
        fence_proxy_async_shared();
        qk_exp_over_pv();
        pv_done();
        release(v_empty(pv_stage));
        pack_p(kWhole);
        pv_stage = stage;
        pv_phase = phase;
        if (++stage == Cfg::kStages) { stage = 0; phase ^= 1u; }
        continue;
      }
      const int key_last = key0 + Cfg::kTileKeys - 1;
      // Warpgroup-uniform: does any of its rows see a key of the tile? A mask is needed only where some
      // row's range cuts the tile.
      const bool visible = wg_active && key0 <= wg_pos_hi && !(window > 0 && key_last < wg_pos_lo - window + 1);
      const bool needs_mask = key_last > wg_pos_lo || (window > 0 && key0 < wg_pos_hi - window + 1) ||
                              key0 < w.key_begin || key_last >= w.key_end;
      // No row of the warpgroup sees the tile's second half: this is its last visible tile (the next one
      // starts past wg_pos_hi), so its P·V is the flush after the loop or at the next hidden tile.
      const bool half = kHalfTiles && wg_pos_hi < key0 + kHalf;
      mbarrier_wait(k_full(stage), phase);
      fence_proxy_async_shared();
      // A half tile is its own branch, first, so that the whole tiles' paths stay as they were without it.
      if (visible && half) {
        if (p_pending) {
          mbarrier_wait(v_full(pv_stage), pv_phase);
          fence_proxy_async_shared();
          qk_softmax_over_pv(std::true_type{}, kHalf);
          pv_done();
          release(v_empty(pv_stage));
        } else {
          qk_softmax(std::true_type{}, kHalf);
        }
        pack_p(kHalf);
        p_pending = true;
        p_half = true;
        pv_stage = stage;
        pv_phase = phase;
      } else if (visible && p_pending) {
        mbarrier_wait(v_full(pv_stage), pv_phase);
        fence_proxy_async_shared();
        if (needs_mask) qk_softmax_over_pv(std::true_type{}, kWhole);
        else qk_softmax_over_pv(std::false_type{}, kWhole);
        pv_done();
        release(v_empty(pv_stage));
        pack_p(kWhole);
        pv_stage = stage;
        pv_phase = phase;
      } else if (visible) {
        if (needs_mask) qk_softmax(std::true_type{}, kWhole);
        else qk_softmax(std::false_type{}, kWhole);
        pack_p(kWhole);
        p_pending = true;
        pv_stage = stage;
        pv_phase = phase;
      } else {  // hidden from this warpgroup: release both halves of the slot unread
        release(k_empty(stage));
        wait_turn();
        pass_turn();
        if (p_pending) flush_pending_pv();
        mbarrier_wait(v_full(stage), phase);
        release(v_empty(stage));
      }
      if (++stage == Cfg::kStages) { stage = 0; phase ^= 1u; }
    }
    release(q_empty(this_q_slot));  // every Q·K^T of the item has landed
    if (p_pending) flush_pending_pv();

    // ---- normalize and write this warp's 16 rows, 64 columns at a time, through its staging rows in
    // shared memory: the accumulator gives a thread 4-byte pieces of 8 rows (stored as they are, each store
    // half-fills 8 sectors), the staged rows leave as whole 16-byte chunks, 4 rows a store ----
    if (!wg_active) continue;
    if (o_fresh) {  // no visible key (keys clipped to the block table): zeros, not unwritten registers
#pragma unroll
      for (int i = 0; i < kORegs; ++i) o[i] = 0.f;
    }
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[h] = sum > 0.f ? fast_rcp(sum) : 0.f;
    }
    // Copy-out: lane l takes chunk l % 8 of the warp's rows l / 8 + 4 k.
    const int warp_row0 = wg_row0 + 16 * wg_warp;
    T* out_row[4];
    bool row_ok[4];
    {
      const int fr = w.row0 + warp_row0 + lane / 8;
      int token = group_divisor.div(fr), head = fr - token * group;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        row_ok[k] = warp_row0 + lane / 8 + 4 * k < w.cta_rows;
        out_row[k] = static_cast<T*>(p.out) +
                     (int64_t(w.q_start + token) * p.num_heads + w.kv_head * group + head) * kHeadSize + 8 * (lane % 8);
        token += four_rows_tokens;
        head += four_rows_heads;
        if (head >= group) {
          head -= group;
          ++token;
        }
      }
    }
    const uint32_t staging = staging_addr + (wg * 4 + wg_warp) * Cfg::kStagingWarpBytes;
    unsigned char* const staging_ptr = smem + (staging - q_addr);
#pragma unroll
    for (int half = 0; half < Cfg::kHalves; ++half) {
      // stmatrix x4 of n-blocks j, j + 1: matrices (rows 0-7, j), (rows 8-15, j), (rows 0-7, j + 1),
      // (rows 8-15, j + 1); lane l addresses row l % 16 of n-block j + l / 16.
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = 8 * half + 2 * jj;
        const uint32_t frag[4] = {pack_pair<T>(o[4 * j] * inv[0], o[4 * j + 1] * inv[0]),
                                  pack_pair<T>(o[4 * j + 2] * inv[1], o[4 * j + 3] * inv[1]),
                                  pack_pair<T>(o[4 * j + 4] * inv[0], o[4 * j + 5] * inv[0]),
                                  pack_pair<T>(o[4 * j + 6] * inv[1], o[4 * j + 7] * inv[1])};
        stmatrix_x4(staging + sw128_offset(lane % 16, 2 * jj + lane / 16, 0), frag);
      }
      __syncwarp();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint4 v = *reinterpret_cast<const uint4*>(staging_ptr + sw128_offset(lane / 8 + 4 * k, lane % 8, 0));
        if (row_ok[k]) *reinterpret_cast<uint4*>(out_row[k] + 64 * half) = v;
      }
      __syncwarp();
    }
  }
  if (wg == 0) wait_turn();  // warpgroup 1's last pass: no arrival left pending at exit
#else
  __trap();  // built without sm_90a code: the launcher never routes here (wgmma_build_probe_kernel)
#endif
}

}  // namespace pagedinfer::attention
