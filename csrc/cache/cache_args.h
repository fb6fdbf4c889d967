// The cache-op contracts (ops.h), checked once for the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <vector>

#include "core/checks.h"

namespace pagedinfer {

struct CacheShape {
  int64_t num_tokens, num_kv_heads, head_size, num_blocks, block_size;
};

inline CacheShape check_reshape_and_cache_args(const at::Tensor& key, const at::Tensor& value,
                                               const at::Tensor& kv_cache,
                                               const at::Tensor& slot_mapping) {
  check_kv_cache(kv_cache, "kv_cache");
  check_dim(key, 3, "key");
  check_dim(value, 3, "value");
  check_dim(slot_mapping, 1, "slot_mapping");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  check_contiguous(slot_mapping, "slot_mapping");
  check_same_dtype(key, kv_cache, "key", "kv_cache");
  check_same_dtype(value, kv_cache, "value", "kv_cache");
  check_same_device(key, kv_cache, "key", "kv_cache");
  check_same_device(value, kv_cache, "value", "kv_cache");
  check_same_device(slot_mapping, kv_cache, "slot_mapping", "kv_cache");
  CacheShape s{key.size(0), kv_cache.size(3), kv_cache.size(4), kv_cache.size(1), kv_cache.size(2)};
  PI_CHECK(key.size(1) == s.num_kv_heads && key.size(2) == s.head_size, "key must be [num_tokens, ",
           s.num_kv_heads, ", ", s.head_size, "] to match kv_cache, got ", key.sizes());
  PI_CHECK(value.sizes() == key.sizes(), "value must have key's shape ", key.sizes(), ", got ", value.sizes());
  PI_CHECK(slot_mapping.size(0) == s.num_tokens, "slot_mapping has ", slot_mapping.size(0),
           " entries but key has ", s.num_tokens, " tokens");
  for (auto* t : {&key, &value}) {
    // Row stride is free (views of a fused qkv projection), heads and head dim must be packed.
    PI_CHECK(t->stride(2) == 1 && t->stride(1) == s.head_size,
             "key and value must have contiguous heads ([num_tokens, num_kv_heads, head_size] with strides "
             "[any, head_size, 1]), got strides ", t->strides());
  }
  return s;
}

// Every cache of the list has the first one's shape, dtype and device.
inline void check_layer_caches(const std::vector<at::Tensor>& caches, const char* name) {
  for (size_t l = 0; l < caches.size(); ++l) {
    check_kv_cache(caches[l], name);
    PI_CHECK(caches[l].sizes() == caches[0].sizes() && caches[l].scalar_type() == caches[0].scalar_type() &&
                 caches[l].device() == caches[0].device(),
             name, "[", l, "] (", caches[l].sizes(), ", ", caches[l].scalar_type(), ", ", caches[l].device(),
             ") differs from ", name, "[0] (", caches[0].sizes(), ", ", caches[0].scalar_type(), ", ",
             caches[0].device(), ")");
  }
}

inline void check_block_mapping(const at::Tensor& block_mapping) {
  check_dim(block_mapping, 2, "block_mapping");
  PI_CHECK(block_mapping.size(1) == 2, "block_mapping must be [num_pairs, 2], got ", block_mapping.sizes());
  check_dtype(block_mapping, at::kLong, "block_mapping");
}

}  // namespace pagedinfer
