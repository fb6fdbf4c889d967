#include "core/index_checks.h"

#include <ATen/ops/empty.h>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/checks.h"
#include "ops.h"

namespace pagedinfer {

namespace {
bool env_debug_checks() {
  const char* v = std::getenv("PAGEDINFER_DEBUG_CHECKS");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}
std::atomic<bool> g_debug_checks{env_debug_checks()};
}  // namespace

void set_debug_checks(bool enabled) { g_debug_checks.store(enabled); }
bool debug_checks_enabled() { return g_debug_checks.load(); }

at::Tensor host_copy(const at::Tensor& t) { return t.is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous(); }

void validate_slot_mapping(const at::Tensor& slot_mapping, int64_t num_slots) {
  at::Tensor s = host_copy(slot_mapping);
  const int64_t* p = s.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.numel(); ++i) {
    PI_CHECK(p[i] >= -1 && p[i] < num_slots, "slot_mapping[", i, "] = ", p[i],
             " is out of range [-1, ", num_slots, ") (num_blocks * block_size)");
  }
}

void validate_attention_metadata(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                 const at::Tensor& block_tables, int64_t num_tokens,
                                 int64_t num_blocks, int64_t block_size, int64_t max_query_len) {
  at::Tensor qsl = host_copy(query_start_loc), lens = host_copy(seq_lens), bt = host_copy(block_tables);
  const int32_t* q = qsl.data_ptr<int32_t>();
  const int32_t* l = lens.data_ptr<int32_t>();
  const int32_t* b = bt.data_ptr<int32_t>();
  const int64_t num_seqs = lens.numel(), max_blocks = bt.size(1);
  PI_CHECK(q[0] == 0, "query_start_loc[0] must be 0, got ", q[0]);
  PI_CHECK(q[num_seqs] == num_tokens, "query_start_loc[", num_seqs, "] = ", q[num_seqs],
           " must equal the number of query tokens ", num_tokens);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = int64_t(q[s + 1]) - q[s];
    PI_CHECK(q_len >= 0, "query_start_loc must not decrease: query_start_loc[", s, "] = ", q[s],
             " > query_start_loc[", s + 1, "] = ", q[s + 1]);
    PI_CHECK(q_len <= max_query_len, "sequence ", s, " has ", q_len, " query tokens but max_query_len is ",
             max_query_len);
    PI_CHECK(l[s] >= 0, "seq_lens[", s, "] = ", l[s], " is negative");
    if (l[s] == 0) continue;  // padded row: reads nothing, writes zeros
    PI_CHECK(l[s] >= q_len, "seq_lens[", s, "] = ", l[s], " is shorter than its ", q_len,
             " query tokens");
    const int64_t used = (int64_t(l[s]) + block_size - 1) / block_size;
    PI_CHECK(used <= max_blocks, "seq_lens[", s, "] = ", l[s], " needs ", used,
             " blocks but block_tables has ", max_blocks, " columns");
    for (int64_t j = 0; j < used; ++j) {
      const int32_t blk = b[s * max_blocks + j];
      PI_CHECK(blk >= 0 && blk < num_blocks, "block_tables[", s, ", ", j, "] = ", blk,
               " is out of range [0, ", num_blocks, ")");
    }
  }
}

void validate_block_mapping(const at::Tensor& block_mapping, int64_t num_src_blocks,
                            int64_t num_dst_blocks) {
  at::Tensor m = host_copy(block_mapping);
  const int64_t* p = m.data_ptr<int64_t>();
  for (int64_t i = 0; i < m.size(0); ++i) {
    PI_CHECK(p[2 * i] >= 0 && p[2 * i] < num_src_blocks, "block_mapping[", i, ", 0] = ", p[2 * i],
             " is out of range [0, ", num_src_blocks, ")");
    PI_CHECK(p[2 * i + 1] >= 0 && p[2 * i + 1] < num_dst_blocks, "block_mapping[", i, ", 1] = ",
             p[2 * i + 1], " is out of range [0, ", num_dst_blocks, ")");
  }
}

}  // namespace pagedinfer
