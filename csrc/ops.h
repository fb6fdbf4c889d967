// Every op of pagedinfer._C, declared once. The contracts (shapes, dtypes, in-place outputs) are frozen:
// the engine is built on them. torch_bindings.cpp registers them; python/pagedinfer/_ops.py wraps them.
//
// KV cache, per layer: kv_cache[2, num_blocks, block_size, num_kv_heads, head_size] (K = [0], V = [1]).
// Attention metadata of one step (num_seqs sequences, num_tokens new tokens in all):
//   query_start_loc[num_seqs + 1] int32   new tokens of sequence i are rows [qsl[i], qsl[i+1]) of query
//   seq_lens[num_seqs]            int32   context + new tokens of sequence i (0: a padded row, output zeros)
//   block_tables[num_seqs, max_blocks] int32   physical block of each logical block
//   slot_mapping[num_tokens]      int64   block * block_size + offset of each new token, -1 = skip
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <vector>

namespace pagedinfer {

// ---- attention ----------------------------------------------------------------------------------
// out[num_tokens, num_heads, head_size] = causal attention of query over the paged context.
// max_query_len: the longest q_len of the step (a host-side fact the scheduler knows; 1 selects the
// split-KV decode path). sliding_window: -1 off, else a token at position p sees keys (p - window, p].
// workspace: float32 scratch for the split-KV reduction, allocated once by the caller
// (paged_attention_workspace_size); None allocates per call (not for CUDA graphs).
void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                         const at::Tensor& block_tables, int64_t max_query_len, double scale,
                         int64_t sliding_window, const std::optional<at::Tensor>& workspace);
void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                          const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                          const at::Tensor& block_tables, int64_t max_query_len, double scale,
                          int64_t sliding_window, const std::optional<at::Tensor>& workspace);
// Number of float32 elements the workspace needs for a launch of this configuration (0 on CPU).
int64_t paged_attention_workspace_size(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_size, int64_t max_blocks_per_seq,
                                       int64_t block_size, int64_t device_index);

// ---- cache ----------------------------------------------------------------------------------------
// kv_cache[:, slot // bs, slot % bs] = key/value[token] for every token whose slot is not -1.
// key, value: [num_tokens, num_kv_heads, head_size], last dim contiguous (row strides free: views of qkv).
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                            const at::Tensor& slot_mapping);
// For every layer's kv_cache and every pair (src, dst) of block_mapping[num_pairs, 2] (int64, on CPU or
// the caches' device): block dst = block src, K and V. One launch for all layers on CUDA.
void copy_blocks_cpu(std::vector<at::Tensor> const& kv_caches, const at::Tensor& block_mapping);
void copy_blocks_cuda(std::vector<at::Tensor> const& kv_caches, const at::Tensor& block_mapping);
// For every layer l and pair (src, dst) of block_mapping[num_pairs, 2] (int64, on CPU):
// dst_caches[l][:, dst] = src_caches[l][:, src]. GPU pool <-> pinned CPU pool, or CPU <-> CPU.
void swap_blocks(std::vector<at::Tensor> const& src_caches, std::vector<at::Tensor> const& dst_caches,
                 const at::Tensor& block_mapping);

// ---- layers ---------------------------------------------------------------------------------------
// out = input / rms(input) * weight over the last dim. input, out: [num_tokens, hidden].
void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
// residual += input; input = rms_norm(residual) * weight (both in place).
void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);
void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);
// Rotate query [num_tokens, num_heads * head_size] and key [num_tokens, num_kv_heads * head_size]
// in place by positions[num_tokens] (int64). cos_sin_cache[max_position, rot_dim]: cos in the first
// rot_dim/2 columns, sin in the rest (rot_dim <= head_size: partial rotary). is_neox: rotate halves
// (GPT-NeoX/Llama) rather than interleaved pairs (GPT-J).
void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox);
void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                           int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox);
// out[..., d] = silu(input[..., :d]) * input[..., d:].
void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input);
void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input);

// ---- sampling -------------------------------------------------------------------------------------
// out[i, j] = a uniform in (0, 1), never 0 or 1, that is a pure function of (seeds[i], offsets[i], j):
// Philox4x32-10 keyed by the seed, counter (j / 4, offset). The same bits on CPU and CUDA, whatever the
// other rows. out[num_rows, num_columns] float32 contiguous; seeds, offsets [num_rows] int64, out's device.
void philox_uniform_cpu(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& offsets);
void philox_uniform_cuda(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& offsets);

// ---- debug ----------------------------------------------------------------------------------------
// Range checks of block ids, slots and lengths run on CPU always; on CUDA only when this is on (they
// copy the metadata to the host). Also on when the environment sets PAGEDINFER_DEBUG_CHECKS=1.
void set_debug_checks(bool enabled);
bool debug_checks_enabled();
// Prompt-kernel launches (since the process started) that loaded Q by TMA, and that ran half-width
// diagonal tiles (prefill_launch_stats.cpp).
std::vector<int64_t> prefill_launch_counts();
void count_prefill_launch(bool q_by_tma, bool half_tiles);

}  // namespace pagedinfer
