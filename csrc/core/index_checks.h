// Range checks of the indices the kernels follow (block ids, slots, lengths). A bad index must be an
// error naming the argument, never an out-of-bounds access. CPU launchers always call these; CUDA
// launchers call them on host copies when debug checks are on (ops.h: set_debug_checks).
#pragma once

#include <ATen/core/Tensor.h>

namespace pagedinfer {

// slot_mapping[num_tokens] int64: each -1 or in [0, num_slots).
void validate_slot_mapping(const at::Tensor& slot_mapping, int64_t num_slots);

// query_start_loc starts at 0, never decreases, ends at num_tokens; every q_len <= max_query_len (the
// decode path reads one row per sequence); every seq_len 0 (padded) or >= q_len; every block a
// sequence reads is in [0, num_blocks).
void validate_attention_metadata(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                 const at::Tensor& block_tables, int64_t num_tokens,
                                 int64_t num_blocks, int64_t block_size, int64_t max_query_len);

// block_mapping[num_pairs, 2] int64: src in [0, num_src_blocks), dst in [0, num_dst_blocks).
void validate_block_mapping(const at::Tensor& block_mapping, int64_t num_src_blocks,
                            int64_t num_dst_blocks);

// Host copy of a (small) index tensor, for the checks above on CUDA inputs.
at::Tensor host_copy(const at::Tensor& t);

}  // namespace pagedinfer
