// Paged attention on the CPU: the same contract as the CUDA kernels (ops.h), float32 arithmetic.
// One task per (new token, kv head): the group's query heads share each K/V row read from the cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention_args.h"
#include "ops.h"

namespace pagedinfer {
namespace {

template <typename T>
void attend_cpu(T* out, const T* query, const T* kv_cache, const int32_t* qsl, const int32_t* lens,
                const int32_t* block_tables, const AttentionShape& s, int64_t q_row_stride,
                float scale, int64_t window) {
  const int64_t group = s.num_heads / s.num_kv_heads, D = s.head_size, bs = s.block_size;
  const int64_t token_stride = s.num_kv_heads * D;             // between tokens of a block
  const int64_t block_stride = bs * token_stride;              // between blocks
  const int64_t v_offset = s.num_blocks * block_stride;        // K = [0], V = [1]

  // Sequence of every query token: tokens are grouped by sequence in query_start_loc order.
  std::vector<int32_t> seq_of(s.num_tokens);
  for (int64_t q = 0; q < s.num_seqs; ++q)
    for (int64_t t = qsl[q]; t < qsl[q + 1]; ++t) seq_of[t] = int32_t(q);

  at::parallel_for(0, s.num_tokens * s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_f(group * D), acc(group * D), row(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / s.num_kv_heads, kvh = task % s.num_kv_heads;
      const int64_t seq = seq_of[t], seq_len = lens[seq], q_len = qsl[seq + 1] - qsl[seq];
      T* o = out + (t * s.num_heads + kvh * group) * D;
      if (seq_len == 0) {  // padded row
        std::fill(o, o + group * D, T(0));
        continue;
      }
      const int64_t pos = seq_len - q_len + (t - qsl[seq]);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t n = pos + 1 - lo;
      for (int64_t h = 0; h < group * D; ++h) {
        q_f[h] = float(query[t * q_row_stride + kvh * group * D + h]) * scale;
      }
      scores.assign(group * n, 0.f);
      const int32_t* table = block_tables + seq * s.max_blocks_per_seq;
      auto kv_row = [&](int64_t k) {
        return kv_cache + int64_t(table[k / bs]) * block_stride + (k % bs) * token_stride + kvh * D;
      };
      for (int64_t k = lo; k <= pos; ++k) {
        const T* kr = kv_row(k);
        for (int64_t d = 0; d < D; ++d) row[d] = float(kr[d]);
        for (int64_t g = 0; g < group; ++g) {
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += q_f[g * D + d] * row[d];
          scores[g * n + (k - lo)] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * n;
        const float mx = *std::max_element(sc, sc + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) sum += (sc[i] = std::exp(sc[i] - mx));
        for (int64_t i = 0; i < n; ++i) sc[i] /= sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = lo; k <= pos; ++k) {
        const T* vr = kv_row(k) + v_offset;
        for (int64_t d = 0; d < D; ++d) row[d] = float(vr[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + (k - lo)];
          for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * row[d];
        }
      }
      for (int64_t h = 0; h < group * D; ++h) o[h] = T(acc[h]);
    }
  });
}

}  // namespace

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                         const at::Tensor& block_tables, int64_t max_query_len, double scale,
                         int64_t sliding_window, const std::optional<at::Tensor>& workspace) {
  const AttentionShape s = check_paged_attention_args(out, query, kv_cache, query_start_loc, seq_lens,
                                                      block_tables, max_query_len, sliding_window);
  (void)workspace;  // the CPU path needs no split-KV scratch
  validate_attention_metadata(query_start_loc, seq_lens, block_tables, s.num_tokens, s.num_blocks,
                              s.block_size, max_query_len);
  if (s.num_tokens == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_cpu", [&] {
    attend_cpu<scalar_t>(out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
                         kv_cache.data_ptr<scalar_t>(), query_start_loc.data_ptr<int32_t>(),
                         seq_lens.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(), s,
                         query.stride(0), float(scale), sliding_window);
  });
}

#ifndef PAGEDINFER_WITH_CUDA
int64_t paged_attention_workspace_size(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                       int64_t device_index) {
  PI_CHECK(device_index < 0, "this pagedinfer build has no CUDA kernels (device_index ", device_index, ")");
  return 0;
}
#endif

}  // namespace pagedinfer
