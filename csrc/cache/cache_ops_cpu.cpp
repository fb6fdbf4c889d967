// KV-cache data movement on the CPU: writes of new K/V, block copies on fork, swaps between pools.
#include <ATen/Parallel.h>

#include <cstring>

#include "cache/cache_args.h"
#include "core/index_checks.h"
#include "ops.h"

namespace pagedinfer {

#ifdef PAGEDINFER_WITH_CUDA
// cache_ops.cu: swaps with a CUDA pool on either side.
void swap_blocks_cuda(std::vector<at::Tensor> const& src_caches, std::vector<at::Tensor> const& dst_caches,
                      const at::Tensor& block_mapping);
#endif

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping) {
  const CacheShape s = check_reshape_and_cache_args(key, value, kv_cache, slot_mapping);
  validate_slot_mapping(slot_mapping, s.num_blocks * s.block_size);
  const int64_t elem = kv_cache.element_size(), row_bytes = s.num_kv_heads * s.head_size * elem;
  const int64_t v_offset = s.num_blocks * s.block_size * row_bytes;  // bytes from K to V half
  auto* cache = static_cast<char*>(kv_cache.data_ptr());
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * elem, v_stride = value.stride(0) * elem;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::parallel_for(0, s.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;  // padding
      char* dst = cache + slots[t] * row_bytes;  // slot = block * block_size + offset: rows are packed
      std::memcpy(dst, k + t * k_stride, row_bytes);
      std::memcpy(dst + v_offset, v + t * v_stride, row_bytes);
    }
  });
}

// Copies whole blocks (K and V) of every layer by block_mapping; shared by copy_blocks and CPU swaps.
static void copy_block_pairs_cpu(std::vector<at::Tensor> const& src, std::vector<at::Tensor> const& dst,
                                 const at::Tensor& block_mapping) {
  const at::Tensor mapping = block_mapping.to(at::kCPU).contiguous();
  const int64_t* pairs = mapping.data_ptr<int64_t>();
  const int64_t num_pairs = mapping.size(0), num_layers = int64_t(src.size());
  at::parallel_for(0, num_layers * num_pairs * 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / (num_pairs * 2), p = (task / 2) % num_pairs, kv = task % 2;
      const int64_t block_bytes = src[l].stride(1) * src[l].element_size();
      const auto* s = static_cast<const char*>(src[l].data_ptr()) + kv * src[l].stride(0) * src[l].element_size();
      auto* d = static_cast<char*>(dst[l].data_ptr()) + kv * dst[l].stride(0) * dst[l].element_size();
      std::memcpy(d + pairs[2 * p + 1] * block_bytes, s + pairs[2 * p] * block_bytes, block_bytes);
    }
  });
}

void copy_blocks_cpu(std::vector<at::Tensor> const& kv_caches, const at::Tensor& block_mapping) {
  check_block_mapping(block_mapping);
  if (kv_caches.empty() || block_mapping.size(0) == 0) return;
  check_layer_caches(kv_caches, "kv_caches");
  validate_block_mapping(block_mapping, kv_caches[0].size(1), kv_caches[0].size(1));
  copy_block_pairs_cpu(kv_caches, kv_caches, block_mapping);
}

void swap_blocks(std::vector<at::Tensor> const& src_caches, std::vector<at::Tensor> const& dst_caches,
                 const at::Tensor& block_mapping) {
  check_block_mapping(block_mapping);
  PI_CHECK(block_mapping.is_cpu(), "block_mapping must be on the CPU, got ", block_mapping.device());
  PI_CHECK(src_caches.size() == dst_caches.size(), "src_caches has ", src_caches.size(),
           " layers but dst_caches has ", dst_caches.size());
  if (src_caches.empty() || block_mapping.size(0) == 0) return;
  check_layer_caches(src_caches, "src_caches");
  check_layer_caches(dst_caches, "dst_caches");
  const at::Tensor& s = src_caches[0];
  const at::Tensor& d = dst_caches[0];
  PI_CHECK(s.scalar_type() == d.scalar_type() && s.size(2) == d.size(2) && s.size(3) == d.size(3) &&
               s.size(4) == d.size(4),
           "src_caches (", s.sizes(), ", ", s.scalar_type(), ") and dst_caches (", d.sizes(), ", ",
           d.scalar_type(), ") must differ only in num_blocks");
  validate_block_mapping(block_mapping, s.size(1), d.size(1));
  if (s.is_cpu() && d.is_cpu()) {
    copy_block_pairs_cpu(src_caches, dst_caches, block_mapping);
    return;
  }
#ifdef PAGEDINFER_WITH_CUDA
  swap_blocks_cuda(src_caches, dst_caches, block_mapping);
#else
  PI_CHECK(false, "swap_blocks between ", s.device(), " and ", d.device(), " needs the CUDA kernels");
#endif
}

}  // namespace pagedinfer
