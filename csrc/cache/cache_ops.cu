// KV-cache data movement on CUDA: writes of new K/V, block copies on fork, swaps between the GPU pool
// and the pinned CPU pool. Launchers only; the kernels are in cache_kernels.cuh.
//
// These ops copy bits, so they dispatch on the access width (16 bytes where every address, stride and
// size allows, narrower otherwise), not on the dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "cache/cache_args.h"
#include "cache/cache_kernels.cuh"
#include "core/index_checks.h"
#include "ops.h"

namespace pagedinfer {

// Declared in cache_ops_cpu.cpp, whose swap_blocks validates and calls it when a pool is on CUDA.
void swap_blocks_cuda(std::vector<at::Tensor> const& src_caches, std::vector<at::Tensor> const& dst_caches,
                      const at::Tensor& block_mapping);

namespace {

// The widest access (16, 8, 4, 2 or 1 bytes) that divides every byte address, stride and size given.
int widest_access(std::initializer_list<int64_t> byte_values) {
  int width = 16;
  for (int64_t v : byte_values) {
    while (v % width != 0) width /= 2;
  }
  return width;
}

int64_t address_of(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// Calls f(cache::Access<width>{}) for a width widest_access returned.
template <typename F>
void dispatch_access_width(int width, F&& f) {
  switch (width) {
    case 16: f(cache::Access<16>{}); break;
    case 8: f(cache::Access<8>{}); break;
    case 4: f(cache::Access<4>{}); break;
    case 2: f(cache::Access<2>{}); break;
    default: f(cache::Access<1>{}); break;
  }
}

int multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Copies a host table of int64 (layer addresses, block pairs) to `device` on the current stream without
// blocking the host: it is staged in pinned memory, and torch's host allocator keeps that staging
// buffer from reuse until the copy has run.
at::Tensor upload_table(const std::vector<int64_t>& table, at::Device device) {
  at::Tensor staged = at::empty({int64_t(table.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(table.begin(), table.end(), staged.data_ptr<int64_t>());
  return staged.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

// Appends the (src, dst) pairs of a CPU block_mapping to a table.
void append_pairs(std::vector<int64_t>& table, const at::Tensor& block_mapping) {
  const at::Tensor pairs = block_mapping.contiguous();
  const int64_t* p = pairs.data_ptr<int64_t>();
  table.insert(table.end(), p, p + pairs.numel());
}

constexpr int kCopyUnroll = 8;  // 8 x 16-byte words in flight per thread: 32 KiB per CTA

// Device tables of one copy_block_pairs launch, and what sizes it.
struct BlockCopy {
  const int64_t* src_layers;        // [num_layers] on the device
  const int64_t* dst_layers;        // [num_layers] on the device
  const int64_t* pairs;             // [num_pairs, 2] on the device
  int64_t num_layers, num_pairs;
  std::vector<int64_t> addresses;   // every layer address, src and dst, for the access width
};

// Launches copy_block_pairs_kernel over every (layer, pair, half) on at most max_ctas CTAs. src_cache0 and
// dst_cache0 (layer 0 of each side) give the sizes: a block is [block_size, num_kv_heads, head_size],
// equal on both sides; the K-to-V distance differs when the pools have different num_blocks.
void launch_copy_block_pairs(const BlockCopy& copy, const at::Tensor& src_cache0, const at::Tensor& dst_cache0,
                             int64_t max_ctas, cudaStream_t stream) {
  const int64_t block_bytes = src_cache0.stride(1) * src_cache0.element_size();
  const int64_t src_half_bytes = src_cache0.stride(0) * src_cache0.element_size();
  const int64_t dst_half_bytes = dst_cache0.stride(0) * dst_cache0.element_size();
  if (block_bytes == 0) return;
  // The kernel indexes inside a block with int.
  PI_CHECK(block_bytes <= INT_MAX - int64_t(kCopyUnroll) * cache::kCopyThreads, "a KV cache block of ",
           block_bytes, " bytes is too large");
  int width = widest_access({block_bytes});
  for (int64_t address : copy.addresses) width = std::min(width, widest_access({address}));
  const int64_t num_tasks = copy.num_layers * copy.num_pairs * 2;
  const unsigned grid = unsigned(std::min(num_tasks, max_ctas));
  dispatch_access_width(width, [&](auto access) {
    using Word = typename decltype(access)::type;
    cache::copy_block_pairs_kernel<Word, kCopyUnroll><<<grid, cache::kCopyThreads, 0, stream>>>(
        copy.src_layers, copy.dst_layers, copy.pairs, copy.num_pairs, num_tasks, int(block_bytes / width),
        src_half_bytes / width, dst_half_bytes / width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The address at which the device of the current context reads/writes each layer's cache: its data
// pointer for a CUDA tensor, the device mapping of its pinned memory for a CPU tensor.
std::vector<int64_t> device_addresses(const std::vector<at::Tensor>& caches, const char* name) {
  std::vector<int64_t> addresses;
  addresses.reserve(caches.size());
  for (size_t l = 0; l < caches.size(); ++l) {
    void* data = caches[l].data_ptr();
    if (caches[l].is_cuda()) {
      addresses.push_back(address_of(data));
      continue;
    }
    cudaPointerAttributes attributes{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, data));
    PI_CHECK(attributes.type == cudaMemoryTypeHost && attributes.devicePointer != nullptr, name, "[", l,
             "] must be in pinned memory (torch.empty(..., pin_memory=True) or .pin_memory()): swap_blocks "
             "reads and writes the CPU pool from the GPU through its device mapping");
    addresses.push_back(address_of(attributes.devicePointer));
  }
  return addresses;
}

}  // namespace

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                            const at::Tensor& slot_mapping) {
  const CacheShape s = check_reshape_and_cache_args(key, value, kv_cache, slot_mapping);
  PI_CHECK(kv_cache.is_cuda(), "reshape_and_cache_cuda needs CUDA tensors, got kv_cache on ", kv_cache.device());
  const int64_t num_slots = s.num_blocks * s.block_size;
  if (debug_checks_enabled()) validate_slot_mapping(slot_mapping, num_slots);
  const int64_t elem = kv_cache.element_size(), row_bytes = s.num_kv_heads * s.head_size * elem;
  if (s.num_tokens == 0 || row_bytes == 0) return;
  PI_CHECK(row_bytes <= INT_MAX, "a KV cache row of ", row_bytes, " bytes is too large");

  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int width = widest_access({row_bytes, key.stride(0) * elem, value.stride(0) * elem,
                                   address_of(key.data_ptr()), address_of(value.data_ptr()),
                                   address_of(kv_cache.data_ptr())});
  const int row_words = int(row_bytes / width);
  // blockDim.x threads per token (a warp multiple, or a power of two below 32 so that short rows of
  // several tokens share a warp), blockDim.y tokens per CTA of at most 256 threads.
  int threads_per_token = 1;
  while (threads_per_token < std::min(row_words, 32)) threads_per_token *= 2;
  if (row_words > 32) threads_per_token = std::min((row_words + 31) / 32 * 32, 256);
  const int tokens_per_cta = 256 / threads_per_token;
  const int64_t grid = (s.num_tokens + tokens_per_cta - 1) / tokens_per_cta;
  PI_CHECK(grid <= INT_MAX, "reshape_and_cache: ", s.num_tokens, " tokens is too many for one launch");
  dispatch_access_width(width, [&](auto access) {
    using Word = typename decltype(access)::type;
    cache::reshape_and_cache_kernel<Word><<<unsigned(grid), dim3(threads_per_token, tokens_per_cta), 0, stream>>>(
        static_cast<const Word*>(key.data_ptr()), static_cast<const Word*>(value.data_ptr()),
        static_cast<Word*>(kv_cache.data_ptr()), slot_mapping.data_ptr<int64_t>(), s.num_tokens, row_words,
        key.stride(0) * elem / width, value.stride(0) * elem / width, num_slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void copy_blocks_cuda(std::vector<at::Tensor> const& kv_caches, const at::Tensor& block_mapping) {
  check_block_mapping(block_mapping);
  if (kv_caches.empty() || block_mapping.size(0) == 0) return;
  check_layer_caches(kv_caches, "kv_caches");
  const at::Tensor& cache0 = kv_caches[0];
  PI_CHECK(cache0.is_cuda(), "copy_blocks_cuda needs CUDA caches, got kv_caches on ", cache0.device());
  PI_CHECK(block_mapping.is_cpu() || block_mapping.device() == cache0.device(),
           "block_mapping must be on the CPU or on the caches' device ", cache0.device(), ", got ",
           block_mapping.device());
  // A CPU mapping is checked always (it is on the host already); a device one only in debug mode.
  if (block_mapping.is_cpu() || debug_checks_enabled()) {
    validate_block_mapping(block_mapping, cache0.size(1), cache0.size(1));
  }

  const c10::cuda::CUDAGuard guard(cache0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_layers = int64_t(kv_caches.size()), num_pairs = block_mapping.size(0);
  std::vector<int64_t> layer_addresses;
  for (const at::Tensor& cache : kv_caches) layer_addresses.push_back(address_of(cache.data_ptr()));
  // One device table, uploaded in one copy: [layer addresses | block pairs if the mapping is on the CPU].
  std::vector<int64_t> table = layer_addresses;
  if (block_mapping.is_cpu()) append_pairs(table, block_mapping);
  const at::Tensor device_table = upload_table(table, cache0.device());
  const at::Tensor device_mapping = block_mapping.is_cpu() ? at::Tensor() : block_mapping.contiguous();
  const int64_t* layers = device_table.data_ptr<int64_t>();
  const int64_t* pairs = block_mapping.is_cpu() ? layers + num_layers : device_mapping.data_ptr<int64_t>();
  // Device memory on both sides: enough CTAs to keep HBM busy, the rest of the tasks by grid stride.
  const int64_t max_ctas = 4 * int64_t(multiprocessor_count(cache0.device().index()));
  launch_copy_block_pairs({layers, layers, pairs, num_layers, num_pairs, layer_addresses}, cache0, cache0, max_ctas,
                          stream);
}

// Why a kernel rather than copies: a swap moves num_layers * num_pairs * 2 separate blocks of a few
// tens of KiB (e.g. 32 layers x 100 pairs x K/V = 6400 pieces of 32 KiB). One cudaMemcpyAsync per piece
// costs microseconds of driver time each and stays far from the link's bandwidth; cudaMemcpyBatchAsync
// (CUDA 12.8+) still takes per-copy host arrays of that length and leaves the per-piece handling to the
// driver and copy engines. Pinned host memory is mapped into the device's address space (UVA), so one
// gather/scatter kernel reads the source blocks and writes the destination blocks directly, every
// layer, pair and half in one launch on the current stream, with 16-byte accesses, 8 independent loads
// per thread before its stores to hide PCIe latency. The same kernel serves both directions and GPU to
// GPU. Its cost: the CTAs occupy SMs while the transfer runs, so the grid is capped at one CTA per SM,
// already ~4 MiB of reads in flight, far more than PCIe latency x bandwidth (~2 us x 55 GB/s = 110 KB).
// Measured on an H100 (32 layers x 512 scattered pairs x K/V x 32 KiB = 1 GiB): 52.2 GB/s GPU to CPU and
// 50.5 GB/s CPU to GPU, 95% and 92% of a pinned copy_ of 1 GiB in one piece (55.1 and 54.8 GB/s).
void swap_blocks_cuda(std::vector<at::Tensor> const& src_caches, std::vector<at::Tensor> const& dst_caches,
                      const at::Tensor& block_mapping) {
  // swap_blocks (cache_ops_cpu.cpp) has checked the layer lists, their shapes and the mapping's range.
  const at::Tensor& src0 = src_caches[0];
  const at::Tensor& dst0 = dst_caches[0];
  for (const auto* side : {&src0, &dst0}) {
    PI_CHECK(side->is_cuda() || side->is_cpu(), "swap_blocks copies between CUDA and CPU caches, got src_caches on ",
             src0.device(), " and dst_caches on ", dst0.device());
  }
  PI_CHECK(src0.is_cuda() || dst0.is_cuda(), "swap_blocks_cuda needs a CUDA pool on one side, got src_caches on ",
           src0.device(), " and dst_caches on ", dst0.device());
  PI_CHECK(!(src0.is_cuda() && dst0.is_cuda()) || src0.device() == dst0.device(),
           "swap_blocks between two CUDA pools needs them on one device, got src_caches on ", src0.device(),
           " and dst_caches on ", dst0.device());
  const at::Device gpu = src0.is_cuda() ? src0.device() : dst0.device();
  const c10::cuda::CUDAGuard guard(gpu);  // the pinned pool's device mapping is looked up for this device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t num_layers = int64_t(src_caches.size()), num_pairs = block_mapping.size(0);
  // Every layer address, sources then destinations, then the block pairs: one device table, one upload.
  std::vector<int64_t> addresses = device_addresses(src_caches, "src_caches");
  const std::vector<int64_t> dst_addresses = device_addresses(dst_caches, "dst_caches");
  addresses.insert(addresses.end(), dst_addresses.begin(), dst_addresses.end());
  std::vector<int64_t> table = addresses;
  append_pairs(table, block_mapping);
  const at::Tensor device_table = upload_table(table, gpu);
  const int64_t* layers = device_table.data_ptr<int64_t>();

  const int64_t sms = multiprocessor_count(gpu.index());
  // Over PCIe one CTA per SM saturates the link (see above); GPU to GPU gets copy_blocks' grid.
  const int64_t max_ctas = (src0.is_cuda() && dst0.is_cuda()) ? 4 * sms : sms;
  launch_copy_block_pairs({layers, layers + num_layers, layers + 2 * num_layers, num_layers, num_pairs, addresses},
                          src0, dst0, max_ctas, stream);
}

}  // namespace pagedinfer
