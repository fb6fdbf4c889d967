// The paged_attention contract, checked once for the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include "core/checks.h"
#include "core/index_checks.h"

namespace pagedinfer {

struct AttentionShape {
  int64_t num_tokens, num_heads, num_kv_heads, head_size;
  int64_t num_seqs, max_blocks_per_seq, num_blocks, block_size;
};

inline AttentionShape check_paged_attention_args(const at::Tensor& out, const at::Tensor& query,
                                                 const at::Tensor& kv_cache,
                                                 const at::Tensor& query_start_loc,
                                                 const at::Tensor& seq_lens,
                                                 const at::Tensor& block_tables,
                                                 int64_t max_query_len, int64_t sliding_window) {
  check_dim(query, 3, "query");
  check_float_dtype(query, "query");
  check_kv_cache(kv_cache, "kv_cache");
  check_same_dtype(kv_cache, query, "kv_cache", "query");
  check_same_dtype(out, query, "out", "query");
  PI_CHECK(out.sizes() == query.sizes(), "out must have query's shape ", query.sizes(), ", got ",
           out.sizes());
  PI_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2),
           "query must be [num_tokens, num_heads, head_size] with contiguous heads, got strides ",
           query.strides());
  check_contiguous(out, "out");
  check_dim(query_start_loc, 1, "query_start_loc");
  check_dim(seq_lens, 1, "seq_lens");
  check_dim(block_tables, 2, "block_tables");
  check_dtype(query_start_loc, at::kInt, "query_start_loc");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  check_dtype(block_tables, at::kInt, "block_tables");
  check_contiguous(query_start_loc, "query_start_loc");
  check_contiguous(seq_lens, "seq_lens");
  check_contiguous(block_tables, "block_tables");
  check_same_device(out, query, "out", "query");
  check_same_device(kv_cache, query, "kv_cache", "query");
  check_same_device(query_start_loc, query, "query_start_loc", "query");
  check_same_device(seq_lens, query, "seq_lens", "query");
  check_same_device(block_tables, query, "block_tables", "query");
  AttentionShape s;
  s.num_tokens = query.size(0);
  s.num_heads = query.size(1);
  s.head_size = query.size(2);
  s.num_blocks = kv_cache.size(1);
  s.block_size = kv_cache.size(2);
  s.num_kv_heads = kv_cache.size(3);
  s.num_seqs = seq_lens.size(0);
  s.max_blocks_per_seq = block_tables.size(1);
  PI_CHECK(kv_cache.size(4) == s.head_size, "kv_cache head_size ", kv_cache.size(4),
           " differs from query's ", s.head_size);
  PI_CHECK(s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0, "num_heads ", s.num_heads,
           " is not divisible by num_kv_heads ", s.num_kv_heads);
  PI_CHECK(query_start_loc.size(0) == s.num_seqs + 1, "query_start_loc must have num_seqs + 1 = ",
           s.num_seqs + 1, " entries, got ", query_start_loc.size(0));
  PI_CHECK(block_tables.size(0) == s.num_seqs, "block_tables must have num_seqs = ", s.num_seqs,
           " rows, got ", block_tables.size(0));
  PI_CHECK(max_query_len >= 1 || s.num_tokens == 0, "max_query_len must be >= 1, got ",
           max_query_len);
  PI_CHECK(sliding_window == -1 || sliding_window > 0, "sliding_window must be -1 (off) or > 0, got ",
           sliding_window);
  PI_CHECK(s.head_size > 0 && s.head_size <= 256, "head_size must be in [1, 256], got ", s.head_size);
  return s;
}

}  // namespace pagedinfer
