// The CUDA launcher of paged_attention (contract in ops.h) and the split-KV plan that sizes its workspace.
//
// Kernels:
//   wgmma_ws_prefill_kernel.cuh  max_query_len > 1, fp16/bf16, head_size 64 or 128, on an sm_90 device with
//                                sm_90a code: warpgroup MMA (wgmma), warp-specialized (a loader warpgroup,
//                                two computing), persistent (one CTA per SM walks items of 128 (token, head)
//                                rows), 128-key tiles; Q by TMA (make_prefill_q_map), K/V by cp.async
//   mma_prefill_kernel.cuh       the same prompt chunks elsewhere (or under PAGEDINFER_PREFILL_KERNEL=mma,
//                                read at every launch): FlashAttention-2 style, mma.sync, one CTA per
//                                (sequence, kv head, row tile), 64-key tiles
//                                Either way the single-token sequences of a mixed step are a second launch
//                                on the same metadata, of the decode kernel below
//   mma_attention_kernel.cuh     decode (max_query_len == 1), fp16/bf16 with head_size 64 or 128: one CTA
//                                per (sequence, kv head, head tile, split), the GQA group as the M of the MMA;
//                                also the general path, per query token, when `out` is not 16-byte aligned
//                                or the scale is not positive (the prefill kernel's preconditions)
//   simt_attention_kernel.cuh    everything else (float32, other head sizes, unaligned caches), one CTA per
//                                (query row, kv head, head tile, split)
//   split_kv_reduce_kernel.cuh   merges the splits' partial results when a launch has more than one
//   decode_order_kernel.cuh      before an unsplit decode grid of more than one wave: its sequences
//                                longest first (the tensor-core decode kernel reads its rows in that order)
// Decode splits long contexts over several CTAs; the SIMT general path gives each query token its own CTAs
// and one split.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

#include "attention/attention_args.h"
#include "attention/decode_order_kernel.cuh"
#include "attention/mma_attention_kernel.cuh"
#include "attention/mma_prefill_kernel.cuh"
#include "attention/simt_attention_kernel.cuh"
#include "attention/split_kv_reduce_kernel.cuh"
#include "attention/wgmma_ws_prefill_kernel.cuh"
#include "ops.h"

namespace pagedinfer {
namespace {

using attention::PagedAttentionParams;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- split-KV plan: host-side, from shapes only ------------------------------------------------------
// The split count must not depend on seq_lens (device data): a CUDA graph captured at short contexts is
// replayed after they have grown. Each split then takes 1/num_splits of its row's keys, computed on the
// device (attention_params.cuh: split_tile_range).
constexpr int64_t kPlanTileKeys = 16;        // keys per tile of the tensor-core kernel
constexpr int64_t kPlanHeadsPerCta = 16;     // query heads per CTA of the tensor-core kernel
constexpr int64_t kResidentCtasPerSm = 2;    // of the head-128 tensor-core kernel (98 KB of shared memory)
constexpr int64_t kMinTilesPerSplit = 16;    // 256 keys: shorter splits cost more to merge than they gain
constexpr int64_t kMaxSplits = 256;

// SM count and compute capability, read from the driver once per device: the launch path runs for every
// layer of every step.
struct DeviceFacts {
  int sm_count = 0;
  int cc_major = 0;
};

DeviceFacts device_facts(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sm_counts[kMaxDevices], cc_majors[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && sm_counts[device].load() > 0) return {sm_counts[device].load(), cc_majors[device].load()};
  DeviceFacts facts;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&facts.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&facts.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  if (cacheable) {
    cc_majors[device].store(facts.cc_major);
    sm_counts[device].store(facts.sm_count);  // last: a nonzero SM count marks the entry complete
  }
  return facts;
}

struct SplitConfig {
  int64_t num_seqs, num_heads, num_kv_heads, head_size, max_blocks_per_seq, block_size, sm_count;
  bool operator==(const SplitConfig&) const = default;
};

// CTAs of one split of a decode launch of the tensor-core kernel: (sequence, kv head, head tile); and how
// many of them one wave holds.
int64_t decode_ctas_per_split(const SplitConfig& c) {
  const int64_t group = c.num_heads / c.num_kv_heads;
  return c.num_seqs * c.num_kv_heads * ceil_div(std::max<int64_t>(group, 1), kPlanHeadsPerCta);
}
int64_t resident_ctas(const SplitConfig& c) { return c.sm_count * kResidentCtasPerSm; }

// As many splits as fit in one wave of resident CTAs (splitting further only adds a partial second wave:
// measured slower on an H100), at least one, and no split shorter than kMinTilesPerSplit tiles of the
// longest possible row (block_tables.size(1) blocks). Batches that fill waves unsplit stay unsplit: a
// floor of 4 splits there (to shorten the tail of ragged batches) was tried on an H200 and cost more
// than it gained (64 x 2048: 0.985x -> 0.908x SDPA; ragged 64 x [128, 8192]: 0.79x -> 0.84x).
int64_t plan_num_splits(const SplitConfig& c) {
  if (c.num_seqs <= 0 || c.num_kv_heads <= 0) return 1;
  const int64_t max_tiles = ceil_div(c.max_blocks_per_seq * c.block_size, kPlanTileKeys);
  int64_t splits = resident_ctas(c) / decode_ctas_per_split(c);
  splits = std::min(splits, max_tiles / kMinTilesPerSplit);
  return std::clamp<int64_t>(splits, 1, kMaxSplits);
}

// Partial results of one launch: num_seqs * num_heads * num_splits rows of head_size outputs, then as
// many log-sum-exps. None when a launch has one split (it writes `out` directly).
int64_t partials_floats(int64_t num_seqs, int64_t num_heads, int64_t head_size, int64_t num_splits) {
  return num_splits > 1 ? num_seqs * num_heads * num_splits * (head_size + 1) : 0;
}

// The workspace a configuration requires: the largest need of any batch of 1..num_seqs sequences (same
// other shapes), so that one buffer sized for the largest batch serves every smaller one, as CUDA graphs
// captured at several batch sizes require. Splits never grow with the batch, so the scan stops at the
// first batch size that needs one split. Memoized: it runs on every launch.
int64_t required_workspace_floats(const SplitConfig& c) {
  thread_local SplitConfig last{-1, 0, 0, 0, 0, 0, 0};
  thread_local int64_t last_need = 0;
  if (c == last) return last_need;
  int64_t need = 0;
  for (int64_t n = 1; n <= c.num_seqs; ++n) {
    SplitConfig smaller = c;
    smaller.num_seqs = n;
    const int64_t splits = plan_num_splits(smaller);
    if (splits == 1) break;
    need = std::max(need, partials_floats(n, c.num_heads, c.head_size, splits));
  }
  // A decode order (unsplit launches only, so it shares the partials' space): one int32 a sequence.
  need = std::max(need, std::min<int64_t>(c.num_seqs, attention::kMaxOrderedSeqs));
  last = c;
  last_need = need;
  return need;
}

// ---- kernel launches ---------------------------------------------------------------------------------

// Launches `kernel` as a programmatic dependent of the stream's previous grid on sm_90 and later: its CTAs
// may start while that grid runs, and wait in griddepcontrol.wait (wait_for_prerequisite_grids) before
// reading its results. An ordinary launch before sm_90.
template <typename... Params, typename... Args>
void launch_programmatic_dependent(void (*kernel)(Params...), int64_t grid, int threads, int smem_bytes,
                                   int device, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(grid));
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = unsigned(smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = device_facts(device).cc_major >= 9 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

void set_dynamic_smem(const void* kernel, int bytes) {
  // Above 48 KB a kernel must opt in. Cheap host call (no device work), valid during graph capture.
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// Calls launch(std::integral_constant<int, B>{}) with B = 16 or 32 (the block sizes the tensor-core
// kernels are specialized for: a key's block is a shift away) or 0 (any block size, read at run time).
template <typename Launch>
void for_block_size(int block_size, Launch&& launch) {
  switch (block_size) {
    case 16: launch(std::integral_constant<int, 16>{}); break;
    case 32: launch(std::integral_constant<int, 32>{}); break;
    default: launch(std::integral_constant<int, 0>{}); break;
  }
}

// A decode grid with a sequence order is the programmatic dependent of the order kernel before it.
template <typename T, int kHeadSize, int kBlockSize>
void launch_mma_kernel(const PagedAttentionParams& p, int64_t grid, int device, cudaStream_t stream) {
  using Cfg = attention::MmaAttentionConfig<T, kHeadSize>;
  const auto kernel = attention::mma_paged_attention_kernel<T, kHeadSize, kBlockSize>;
  set_dynamic_smem(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (p.seq_order != nullptr) {
    launch_programmatic_dependent(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, device, stream, p);
  } else {
    kernel<<<unsigned(grid), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int kHeadSize>
void launch_mma_for_block_size(const PagedAttentionParams& p, int64_t grid, int device, cudaStream_t stream) {
  for_block_size(p.block_size, [&](auto block) {
    launch_mma_kernel<T, kHeadSize, decltype(block)::value>(p, grid, device, stream);
  });
}

// Prompt chunks (max_query_len > 1) on tensor cores: work items of `rows_per_item` (token, head) rows,
// sequences x kv heads x row tiles of them, all from host ints (max_query_len, shapes), so a captured graph
// stays valid as lengths change below those bounds. Returns the row tiles of the longest sequence and the
// number of items; items a shorter sequence does not have are skipped by the kernels.
std::pair<int64_t, int64_t> prefill_items(const PagedAttentionParams& p, int64_t max_query_len,
                                          int64_t rows_per_item) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  PI_CHECK(max_query_len * group <= std::numeric_limits<int32_t>::max(), "paged_attention: max_query_len ",
           max_query_len, " x group ", group, " exceeds the int32 range of the CUDA kernels");
  const int64_t row_tiles = attention::prefill_row_tiles(max_query_len, group, rows_per_item);
  const int64_t items = int64_t(p.num_seqs) * p.num_kv_heads * row_tiles;
  PI_CHECK(items <= std::numeric_limits<int32_t>::max(), "paged_attention: too many work items (", items,
           ") for one launch");
  return {row_tiles, items};
}

// The mma.sync kernel: one CTA per item.
template <typename T, int kHeadSize, int kBlockSize, int kMTiles>
void launch_mma_prefill_kernel(const PagedAttentionParams& p, int64_t max_query_len, cudaStream_t stream) {
  using Cfg = attention::MmaPrefillConfig<T, kHeadSize, kMTiles>;
  const auto kernel = attention::mma_prefill_attention_kernel<T, kHeadSize, kBlockSize, kMTiles>;
  const auto [row_tiles, items] = prefill_items(p, max_query_len, Cfg::kRows);
  set_dynamic_smem(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  kernel<<<unsigned(items), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, int(row_tiles));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cuTensorMapEncodeTiled from the driver the runtime uses (no link against libcuda); null if absent.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return PFN_cuTensorMapEncodeTiled_v12000{nullptr};
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The query as the prompt kernel's TMA map (attention::PrefillQMap): (columns, heads, tokens), rows
// q_row_stride apart; a box of 64 columns (128 bytes, 128-byte swizzled) x group heads x 128 / group tokens,
// one item's half. Only where the group divides 128 (an item then starts at a token's first head) and the
// driver can encode it; else ok = 0 and the kernel copies Q by cp.async.
template <typename T, int kHeadSize>
attention::PrefillQMap make_prefill_q_map(const PagedAttentionParams& p) {
  attention::PrefillQMap q{};  // ok = 0
  const int64_t group = p.num_heads / p.num_kv_heads;
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || 128 % group != 0 || reinterpret_cast<uintptr_t>(p.query) % 16 != 0 ||
      p.q_row_stride % 8 != 0) {
    return q;
  }
  const cuuint64_t dims[3] = {cuuint64_t(kHeadSize), cuuint64_t(p.num_heads), cuuint64_t(p.num_tokens)};
  const cuuint64_t strides[2] = {cuuint64_t(kHeadSize * sizeof(T)), cuuint64_t(p.q_row_stride * sizeof(T))};
  const cuuint32_t box[3] = {64, cuuint32_t(group), cuuint32_t(128 / group)};
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  q.ok = encode(&q.map, type, 3, const_cast<void*>(p.query), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  return q;
}

// PAGEDINFER_PREFILL_KERNEL, read at every launch (a getenv, ~100 ns) so that tests and benches can switch
// kernels within one process: "mma" (the mma.sync kernel), "wgmma_ws_whole" (the wgmma kernel without half
// tiles), else the default choice.
std::string_view prefill_kernel_choice() {
  const char* env = std::getenv("PAGEDINFER_PREFILL_KERNEL");
  return env != nullptr ? env : "";
}

// The warp-specialized wgmma kernel: persistent, one CTA per SM walking the items.
template <typename T, int kHeadSize, int kBlockSize>
void launch_ws_prefill_kernel(const PagedAttentionParams& p, int64_t max_query_len, int device,
                              cudaStream_t stream) {
  using Cfg = attention::WsPrefillConfig<T, kHeadSize>;
  // Half-width diagonal tiles where items have few tiles: where no sequence sees more than 1,024 keys (the
  // block table's width bounds them; the engine sizes it for the step's longest sequence). The other
  // instantiation has the steady state (whole tiles without maxima), which pays over many tiles. On an H200
  // 16 x 512 prompts ran 4 % faster with half tiles, 8 x 512 over 4,096 6 % slower (1 x 8,192 2 % slower,
  // in an earlier A/B).
  // PAGEDINFER_PREFILL_KERNEL=wgmma_ws_whole never uses them: tests run both kernels.
  constexpr int64_t kHalfTilesMaxKeys = 1024;
  const bool half_tiles = int64_t(p.max_blocks_per_seq) * p.block_size <= kHalfTilesMaxKeys &&
                          prefill_kernel_choice() != "wgmma_ws_whole";
  const auto kernel = half_tiles ? attention::wgmma_ws_prefill_attention_kernel<T, kHeadSize, kBlockSize, true>
                                 : attention::wgmma_ws_prefill_attention_kernel<T, kHeadSize, kBlockSize, false>;
  const auto [row_tiles, items] = prefill_items(p, max_query_len, Cfg::kRows);
  const int64_t grid = std::min<int64_t>(items, device_facts(device).sm_count);
  const attention::PrefillQMap q_map = make_prefill_q_map<T, kHeadSize>(p);
  set_dynamic_smem(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  kernel<<<unsigned(grid), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, int(row_tiles), int(items), q_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  count_prefill_launch(q_map.ok != 0, half_tiles);
}

// Rows per warp of the mma.sync prefill kernel: 32 (4 warps, two CTAs per SM; FlashAttention-2's shape)
// unless PAGEDINFER_PREFILL_WARP_ROWS=16 (8 warps, Q in registers, one CTA per SM). Both are kept, and the
// knob read once per process, so that one GPU session can measure both shapes on the same build.
int prefill_warp_m_tiles() {
  static const int m_tiles = [] {
    const char* env = std::getenv("PAGEDINFER_PREFILL_WARP_ROWS");
    return env != nullptr && std::string_view(env) == "16" ? 1 : 2;
  }();
  return m_tiles;
}

// Whether the wgmma kernel can run on `device`: compute capability 9.x, and the device code loaded for it
// built with wgmma (sm_90a, or JIT from compute_90a PTX; not a plain sm_90 target, where the kernel would
// trap): wgmma_build_probe_kernel's static shared memory says which. Once per device; cudaFuncGetAttributes
// is a host call (no launch), legal during graph capture.
bool wgmma_prefill_available(int device) {
  if (device_facts(device).cc_major != 9) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && cached[device].load() != 0) return cached[device].load() == 1;
  cudaFuncAttributes attr{};
  const cudaError_t err =
      cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(attention::wgmma_build_probe_kernel));
  const bool ok = err == cudaSuccess && attr.sharedSizeBytes == size_t(attention::kWgmmaProbeSmemBytes);
  if (err != cudaSuccess) (void)cudaGetLastError();  // no image for this device: clear the error
  if (cacheable) cached[device].store(ok ? 1 : 2);
  return ok;
}

// The wgmma kernel where it can run, unless PAGEDINFER_PREFILL_KERNEL=mma asks for the mma.sync one.
bool use_wgmma_prefill(int device) { return prefill_kernel_choice() != "mma" && wgmma_prefill_available(device); }

template <typename T, int kHeadSize>
void launch_prefill_for_head_size(const PagedAttentionParams& p, int64_t max_query_len, bool wgmma, int device,
                                  cudaStream_t stream) {
  for_block_size(p.block_size, [&](auto block) {
    constexpr int kBlockSize = decltype(block)::value;
    if (wgmma) launch_ws_prefill_kernel<T, kHeadSize, kBlockSize>(p, max_query_len, device, stream);
    else if (prefill_warp_m_tiles() == 1) launch_mma_prefill_kernel<T, kHeadSize, kBlockSize, 1>(p, max_query_len, stream);
    else launch_mma_prefill_kernel<T, kHeadSize, kBlockSize, 2>(p, max_query_len, stream);
  });
}

template <typename T>
void launch_prefill(const PagedAttentionParams& p, int64_t max_query_len, int device, cudaStream_t stream) {
  const bool wgmma = use_wgmma_prefill(device);
  if (p.head_size == 128) launch_prefill_for_head_size<T, 128>(p, max_query_len, wgmma, device, stream);
  else launch_prefill_for_head_size<T, 64>(p, max_query_len, wgmma, device, stream);
}

template <typename T>
void launch_simt_kernel(const PagedAttentionParams& p, int64_t grid, cudaStream_t stream) {
  using Cfg = attention::SimtAttentionConfig;
  const auto kernel = attention::simt_paged_attention_kernel<T>;
  const int smem = Cfg::smem_bytes(p.head_size);
  set_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<unsigned(grid), Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The merge is a programmatic dependent launch on sm_90: its CTAs start while the split kernel's last
// CTAs run (they wait in griddepcontrol.wait), hiding the launch gap, a real share of a 50 us decode.
template <typename T>
void launch_reduce_kernel(const PagedAttentionParams& p, int device, cudaStream_t stream) {
  const int64_t grid = int64_t(p.num_seqs) * p.num_heads;  // one CTA per (sequence, head)
  launch_programmatic_dependent(attention::split_kv_reduce_kernel<T>, grid, attention::SplitKvReduceConfig::kThreads,
                                0, device, stream, p);
}

// The first pass (tensor cores when the case allows), then the merge of splits.
template <typename T>
void launch_attention(const PagedAttentionParams& p, bool tensor_cores, int64_t items, int device,
                      cudaStream_t stream) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t heads_per_cta = tensor_cores ? attention::MmaAttentionConfig<__half, 128>::kRows
                                             : attention::SimtAttentionConfig::kHeads;
  const int64_t grid = items * p.num_kv_heads * ceil_div(group, heads_per_cta) * p.num_splits;
  PI_CHECK(grid <= std::numeric_limits<int32_t>::max(), "paged_attention: too many CTAs (", grid,
           ") for one launch");
  bool launched = false;
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      if (p.head_size == 128) launch_mma_for_block_size<T, 128>(p, grid, device, stream);
      else launch_mma_for_block_size<T, 64>(p, grid, device, stream);
      launched = true;
    }
  }
  if (!launched) launch_simt_kernel<T>(p, grid, stream);
  if (p.num_splits > 1) launch_reduce_kernel<T>(p, device, stream);
}

void check_int32(int64_t value, const char* what) {
  PI_CHECK(value <= std::numeric_limits<int32_t>::max(), what, " = ", value, " exceeds the int32 range of the CUDA kernels");
}

}  // namespace

int64_t paged_attention_workspace_size(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_size, int64_t max_blocks_per_seq, int64_t block_size,
                                       int64_t device_index) {
  if (device_index < 0) return 0;
  PI_CHECK(num_seqs >= 0 && num_heads > 0 && num_kv_heads > 0 && head_size > 0 && max_blocks_per_seq >= 0 &&
               block_size > 0,
           "paged_attention_workspace_size: sizes must be positive, got num_seqs ", num_seqs, ", num_heads ",
           num_heads, ", num_kv_heads ", num_kv_heads, ", head_size ", head_size, ", max_blocks_per_seq ",
           max_blocks_per_seq, ", block_size ", block_size);
  PI_CHECK(num_heads % num_kv_heads == 0, "num_heads ", num_heads, " is not divisible by num_kv_heads ",
           num_kv_heads);
  const int sms = device_facts(int(device_index)).sm_count;
  return required_workspace_floats(
      {num_seqs, num_heads, num_kv_heads, head_size, max_blocks_per_seq, block_size, sms});
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                          const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                          const at::Tensor& block_tables, int64_t max_query_len, double scale,
                          int64_t sliding_window, const std::optional<at::Tensor>& workspace) {
  const AttentionShape s = check_paged_attention_args(out, query, kv_cache, query_start_loc, seq_lens,
                                                      block_tables, max_query_len, sliding_window);
  PI_CHECK(query.is_cuda(), "query must be a CUDA tensor, got ", query.device());
  if (debug_checks_enabled()) {
    validate_attention_metadata(query_start_loc, seq_lens, block_tables, s.num_tokens, s.num_blocks,
                                s.block_size, max_query_len);
  }
  if (s.num_tokens == 0 || s.num_seqs == 0) return;
  check_int32(s.num_tokens, "num_tokens");
  check_int32(s.num_seqs, "num_seqs");
  check_int32(s.num_heads, "num_heads");
  check_int32(s.max_blocks_per_seq * s.block_size, "max_blocks_per_seq * block_size");

  const c10::cuda::CUDAGuard device_guard(query.device());
  const int device = query.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  const bool decode = max_query_len == 1;
  const at::ScalarType dtype = query.scalar_type();
  // Tensor cores need 16-byte aligned K/V rows for cp.async (head_size 64/128 of 2-byte elements are).
  const bool tensor_cores = (dtype == at::kHalf || dtype == at::kBFloat16) &&
                            (s.head_size == 64 || s.head_size == 128) &&
                            reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0;
  // The prompt-chunk kernels also write `out` rows as 4- and 16-byte vectors: a 16-byte aligned `out` (any
  // allocation; only an offset view is not) keeps them aligned, else the per-token kernels serve. They
  // also take the softmax scale as positive (maxima of raw scores), as every model's is.
  const bool chunk_kernel = !decode && tensor_cores && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                            scale > 0;
  // A step that mixes prompt chunks and decodes: the single-token sequences take the decode kernel (a
  // second launch on the same metadata; a 128-row chunk tile would compute 1 / group of its rows), unless
  // the shapes say there are none (every sequence has max_query_len tokens).
  const bool decode_launch = decode || (chunk_kernel && s.num_tokens < s.num_seqs * max_query_len);
  const SplitConfig config{s.num_seqs,           s.num_heads,  s.num_kv_heads,
                           s.head_size,          s.max_blocks_per_seq, s.block_size,
                           device_facts(device).sm_count};
  const int64_t num_splits = decode_launch ? plan_num_splits(config) : 1;
  // An unsplit decode grid of more than one wave of the tensor-core kernel serves its sequences longest
  // first (decode_order_kernel.cuh). Decided from shapes only, as the split count: a graph keeps it.
  const bool order_decodes = decode_launch && num_splits == 1 && tensor_cores && s.num_seqs >= 2 &&
                             s.num_seqs <= attention::kMaxOrderedSeqs &&
                             decode_ctas_per_split(config) > resident_ctas(config);

  at::Tensor scratch;
  if (workspace.has_value()) {
    const at::Tensor& ws = *workspace;
    check_dtype(ws, at::kFloat, "workspace");
    check_same_device(ws, query, "workspace", "query");
    check_contiguous(ws, "workspace");
    const int64_t required = required_workspace_floats(config);
    PI_CHECK(ws.numel() >= required, "workspace has ", ws.numel(), " float32 elements but this launch needs ",
             required, " (num_seqs ", s.num_seqs, ", num_heads ", s.num_heads, ", head_size ", s.head_size,
             ", max_blocks_per_seq ", s.max_blocks_per_seq, "); size it with paged_attention_workspace_size");
    scratch = ws;
  } else if (num_splits > 1) {
    scratch = at::empty({partials_floats(s.num_seqs, s.num_heads, s.head_size, num_splits)},
                        query.options().dtype(at::kFloat));
  } else if (order_decodes) {
    scratch = at::empty({s.num_seqs}, query.options().dtype(at::kFloat));
  }

  PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  if (num_splits > 1) {
    p.partial_out = scratch.data_ptr<float>();
    p.partial_lse = p.partial_out + s.num_seqs * s.num_heads * num_splits * s.head_size;
  }
  p.q_row_stride = query.stride(0);
  p.v_offset = kv_cache.stride(0);
  p.num_tokens = int(s.num_tokens);
  p.num_seqs = int(s.num_seqs);
  p.num_heads = int(s.num_heads);
  p.num_kv_heads = int(s.num_kv_heads);
  p.head_size = int(s.head_size);
  p.block_size = int(s.block_size);
  p.max_blocks_per_seq = int(s.max_blocks_per_seq);
  p.num_splits = int(num_splits);
  p.sliding_window = sliding_window > 0 ? int(std::min<int64_t>(sliding_window, std::numeric_limits<int32_t>::max()))
                                        : -1;
  p.scale_log2 = float(scale * 1.4426950408889634);  // log2(e): exp(x) = exp2(x * log2(e))
  p.one_row_per_seq = decode;

  if (chunk_kernel) {
    p.decodes_elsewhere = decode_launch;
    p.num_splits = 1;
    if (dtype == at::kHalf) launch_prefill<__half>(p, max_query_len, device, stream);
    else launch_prefill<__nv_bfloat16>(p, max_query_len, device, stream);
    if (!decode_launch) return;
    p.decodes_elsewhere = false;
    p.one_row_per_seq = true;  // the decodes of the step, on the decode kernel below
    p.num_splits = int(num_splits);
  }
  if (order_decodes) {
    int32_t* order = reinterpret_cast<int32_t*>(scratch.data_ptr<float>());  // where split partials would go
    attention::decode_order_kernel<<<1, unsigned(ceil_div(s.num_seqs, 32) * 32), 0, stream>>>(
        p.query_start_loc, p.seq_lens, p.num_seqs, order);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p.seq_order = order;
  }
  const int64_t items = p.one_row_per_seq ? s.num_seqs : s.num_tokens;
  switch (dtype) {
    case at::kHalf: launch_attention<__half>(p, tensor_cores, items, device, stream); break;
    case at::kBFloat16: launch_attention<__nv_bfloat16>(p, tensor_cores, items, device, stream); break;
    case at::kFloat: launch_attention<float>(p, false, items, device, stream); break;
    default: PI_CHECK(false, "paged_attention: unsupported dtype ", dtype);
  }
}

}  // namespace pagedinfer
