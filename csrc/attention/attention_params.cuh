// What every paged-attention kernel reads (raw pointers and sizes), and the index math they share:
// which query row a CTA serves, which keys that row sees, which of them one split covers, and where a
// key's row lives in the paged cache. No torch headers.
#pragma once

#include <cstdint>

#include "attention/ptx.cuh"

namespace pagedinfer::attention {

struct PagedAttentionParams {
  void* out;                       // [num_tokens, num_heads, head_size], contiguous
  const void* query;               // [num_tokens, num_heads, head_size], rows q_row_stride apart
  const void* kv_cache;            // [2, num_blocks, block_size, num_kv_heads, head_size], contiguous
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const int32_t* seq_lens;         // [num_seqs]; 0 = padded row (its outputs are zeros)
  const int32_t* block_tables;     // [num_seqs, max_blocks_per_seq]
  // Decode grids: item i serves sequence seq_order[i] (longest first; written by decode_order_kernel, this
  // launch's programmatic prerequisite), or sequence i when null.
  const int32_t* seq_order;
  float* partial_out;              // [num_seqs, num_heads, num_splits, head_size]: split outputs, normalized
  float* partial_lse;              // [num_seqs, num_heads, num_splits]: base-2 log-sum-exp, -inf if empty
  int64_t q_row_stride;            // elements between consecutive query rows
  int64_t v_offset;                // elements from kv_cache[0] to kv_cache[1]
  int num_tokens;
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int block_size;
  int max_blocks_per_seq;
  int num_splits;          // > 1: write partials for split_kv_reduce_kernel; 1: write `out` directly
  int sliding_window;      // -1: off; else the token at position p sees keys (p - window, p]
  float scale_log2;        // softmax scale * log2(e): the kernels exponentiate with exp2
  bool one_row_per_seq;    // decode: grid items are sequences (q_len 1); else grid items are query tokens
  bool decodes_elsewhere;  // prompt-chunk kernels: sequences of one new token are a decode launch's (skip)
};

// What one CTA of either kernel computes: blockIdx.x enumerates (item, kv head, head tile, split), split
// fastest, so the splits of one (row, kv head) run side by side.
struct CtaWork {
  int item;       // grid item: a sequence (decode grids) or a query token (general grids)
  int kv_head;
  int head_tile;  // which tile of heads_per_cta query heads of the kv head's group
  int split;      // which part of the keys (split-KV)
};

__device__ __forceinline__ CtaWork cta_work(const PagedAttentionParams& p, int heads_per_cta) {
  const int group = p.num_heads / p.num_kv_heads;
  const int head_tiles = (group + heads_per_cta - 1) / heads_per_cta;
  int b = blockIdx.x;
  CtaWork w;
  w.split = b % p.num_splits;
  b /= p.num_splits;
  w.head_tile = b % head_tiles;
  b /= head_tiles;
  w.kv_head = b % p.num_kv_heads;
  w.item = b / p.num_kv_heads;
  return w;
}

// One query row a CTA serves: the token (row of query/out) and the keys [key_begin, key_end) it sees.
struct QueryRow {
  int token;      // < 0: nothing to write (a sequence with no query token)
  int seq;
  int key_begin;  // first visible key (sliding window), 0 without a window
  int key_end;    // one past the last visible key: position + 1; <= key_begin when nothing is visible
};

// Grid item -> query row. Decode grids index sequences (their one token is query_start_loc[seq]); general
// grids index tokens and find the sequence by binary search over query_start_loc.
__device__ __forceinline__ QueryRow locate_query_row(const PagedAttentionParams& p, int item) {
  QueryRow r{-1, 0, 0, 0};
  int q_index;  // index of the token among its sequence's new tokens
  int q_len;
  int seq_len;
  if (p.one_row_per_seq) {
    if (p.seq_order != nullptr) {
      wait_for_prerequisite_grids();  // the order is the previous grid's output
      r.seq = p.seq_order[item];
    } else {
      r.seq = item;
    }
    // The three loads are independent: issued together, they cost one memory latency at CTA start.
    r.token = p.query_start_loc[r.seq];
    const int next = p.query_start_loc[r.seq + 1];
    seq_len = p.seq_lens[r.seq];
    q_len = next - r.token;
    // Only single-token sequences: in a step that also has prompt chunks, those are another kernel's.
    if (q_len != 1) return QueryRow{-1, 0, 0, 0};
    q_index = 0;
  } else {
    r.token = item;
    // Last sequence whose first token is <= item: skips sequences with no tokens (equal starts).
    int lo = 0, hi = p.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.query_start_loc[mid] <= item) lo = mid; else hi = mid - 1;
    }
    r.seq = lo;
    const int start = p.query_start_loc[lo];
    q_len = p.query_start_loc[lo + 1] - start;
    q_index = item - start;
    if (q_index < 0 || q_index >= q_len) return r;  // a token outside every sequence: zeros (empty key range)
    seq_len = p.seq_lens[lo];
  }
  if (seq_len <= 0) return r;  // padded row: zeros
  const int position = seq_len - q_len + q_index;
  r.key_end = position + 1;
  // Never read past the block table, even on inconsistent metadata (debug checks catch that on the host).
  const int64_t table_keys = int64_t(p.max_blocks_per_seq) * p.block_size;
  if (r.key_end > table_keys) r.key_end = int(table_keys);
  if (p.sliding_window > 0 && position - p.sliding_window + 1 > 0) r.key_begin = position - p.sliding_window + 1;
  return r;
}

// The tiles [begin, end) that split `split` of `num_splits` takes out of [first, last): equal contiguous
// chunks, rounded up to `multiple` tiles so that the warps of a CTA get equal shares (trailing splits may
// be empty). Computed on the device from the row's own length, so one split count, fixed on the host from
// shapes alone, serves every length (CUDA-graph replay after contexts have grown).
__device__ __forceinline__ void split_tile_range(int first, int last, int num_splits, int split, int multiple,
                                                 int& begin, int& end) {
  const int n = last > first ? last - first : 0;
  int chunk = (n + num_splits - 1) / num_splits;
  chunk = (chunk + multiple - 1) / multiple * multiple;
  const int64_t b = int64_t(first) + int64_t(split) * chunk;
  begin = b < last ? int(b) : last;
  end = begin + chunk < last ? begin + chunk : last;
}

// Element offset, in kv_cache[0], of the row of `key` for the kv head at `head_offset` (kv_head * head_size).
// int64: one layer of the cache can exceed 2^31 elements.
__device__ __forceinline__ int64_t kv_row_offset(const int32_t* block_table, int key, int block_size,
                                                 int64_t token_stride, int64_t head_offset) {
  const int block = key / block_size;
  const int64_t slot = int64_t(block_table[block]) * block_size + (key - block * block_size);
  return slot * token_stride + head_offset;
}

}  // namespace pagedinfer::attention
