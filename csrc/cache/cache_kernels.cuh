// KV-cache data-movement kernels: raw pointers, strides and sizes, no torch headers.
//
// Every op here moves bits (bit-exact by contract), so the kernels copy unsigned words of Access::type
// rather than elements: 16, 8, 4, 2 or 1 bytes, the widest that the launcher found every address,
// stride and size aligned to. All sizes and strides below are counted in those words. Offsets into a
// cache are int64: one layer can hold more than 2^31 elements.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedinfer::cache {

// The unsigned word of kBytes bytes that the copies move.
template <int kBytes>
struct Access;
template <>
struct Access<16> {
  using type = uint4;
};
template <>
struct Access<8> {
  using type = uint2;
};
template <>
struct Access<4> {
  using type = uint32_t;
};
template <>
struct Access<2> {
  using type = uint16_t;
};
template <>
struct Access<1> {
  using type = uint8_t;
};

// Writes each token's K and V rows to row `slot` of the K and V halves of the cache.
// A token's row (num_kv_heads * head_size elements) is contiguous in key/value (heads packed) and in each
// half of the cache ([num_blocks, block_size] are its two outer dims and slot = block * block_size + offset),
// so the op is one row copy per half. The CTA is blockDim.y tokens, each copied by blockDim.x threads.
template <typename Word>
__global__ void reshape_and_cache_kernel(
    const Word* __restrict__ key,              // [num_tokens, row_words], row stride key_stride
    const Word* __restrict__ value,            // [num_tokens, row_words], row stride value_stride
    Word* __restrict__ kv_cache,               // [2, num_slots, row_words]
    const int64_t* __restrict__ slot_mapping,  // [num_tokens], -1 = padding, skipped
    int64_t num_tokens, int row_words, int64_t key_stride, int64_t value_stride, int64_t num_slots) {
  const int64_t token = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) return;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const Word* k_src = key + token * key_stride;
  const Word* v_src = value + token * value_stride;
  Word* k_dst = kv_cache + slot * row_words;
  Word* v_dst = k_dst + num_slots * row_words;
  for (int i = threadIdx.x; i < row_words; i += blockDim.x) {
    // Both loads issue before either store: two independent accesses in flight per thread.
    const Word k = k_src[i], v = v_src[i];
    k_dst[i] = k;
    v_dst[i] = v;
  }
}

// For every layer, every pair of block_mapping and both halves (K, V): copies block src of the layer's
// source cache to block dst of its destination cache. One task = one (layer, pair, half) block copy;
// tasks are spread over the grid by a grid-stride loop, so the launcher sizes the grid for the memory
// it copies through rather than for the task count. Serves copy_blocks (source = destination cache)
// and swap_blocks (one side may be pinned host memory read or written through its device mapping).
constexpr int kCopyThreads = 256;  // copy_block_pairs_kernel's CTA size

template <typename Word, int kUnroll>
__global__ void __launch_bounds__(kCopyThreads) copy_block_pairs_kernel(
    const int64_t* __restrict__ src_layers,     // [num_layers] address of each layer's source cache
    const int64_t* __restrict__ dst_layers,     // [num_layers] address of each layer's destination cache
    const int64_t* __restrict__ block_mapping,  // [num_pairs, 2]: (src block, dst block)
    int64_t num_pairs, int64_t num_tasks,       // num_tasks = num_layers * num_pairs * 2
    int block_words,                            // words in one block of one half
    int64_t src_half_words,                     // K half to V half of a source cache: num_src_blocks * block_words
    int64_t dst_half_words) {                   // the same in a destination cache
  for (int64_t task = blockIdx.x; task < num_tasks; task += gridDim.x) {
    const int64_t half = task % 2, pair = (task / 2) % num_pairs, layer = task / (2 * num_pairs);
    const Word* src = reinterpret_cast<const Word*>(src_layers[layer]) + half * src_half_words +
                      block_mapping[2 * pair] * block_words;
    Word* dst = reinterpret_cast<Word*>(dst_layers[layer]) + half * dst_half_words +
                block_mapping[2 * pair + 1] * block_words;
    // kUnroll independent loads per thread before its first store: reads of host memory over PCIe take
    // a microsecond or more, and only many accesses in flight per SM keep the link busy.
    const int threads = blockDim.x, tid = threadIdx.x;
    for (int base = 0; base < block_words; base += kUnroll * threads) {
      Word staged[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * threads + tid;
        if (i < block_words) staged[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * threads + tid;
        if (i < block_words) dst[i] = staged[u];
      }
    }
  }
}

}  // namespace pagedinfer::cache
