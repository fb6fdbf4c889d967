// How many prompt-kernel launches loaded Q by TMA. A launch whose tensor map cannot be made (or encoded by
// the driver) copies Q by cp.async instead, with the same results: tests read this count to see that TMA
// ran. A host-side count (a CUDA graph's replays add nothing); a CPU-only build keeps it at zero.
#include <atomic>
#include <cstdint>

#include "ops.h"

namespace pagedinfer {
namespace {
std::atomic<int64_t> g_q_by_tma{0};
}  // namespace

void count_prefill_q_tma_launch() { g_q_by_tma.fetch_add(1); }

int64_t prefill_q_tma_launches() { return g_q_by_tma.load(); }

}  // namespace pagedinfer
