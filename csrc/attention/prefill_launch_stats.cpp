// How many prompt-kernel launches loaded Q by TMA, and how many ran the kernel with half-width diagonal
// tiles. A launch whose tensor map cannot be made copies Q by cp.async instead, with the same results (and
// the tiles' width does not change results either): tests read these counts to see what ran. Host-side
// counts (a CUDA graph's replays add nothing); a CPU-only build keeps them at zero.
#include <atomic>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace pagedinfer {
namespace {
std::atomic<int64_t> g_q_by_tma{0};
std::atomic<int64_t> g_half_tiles{0};
}  // namespace

void count_prefill_launch(bool q_by_tma, bool half_tiles) {
  if (q_by_tma) g_q_by_tma.fetch_add(1);
  if (half_tiles) g_half_tiles.fetch_add(1);
}

std::vector<int64_t> prefill_launch_counts() { return {g_q_by_tma.load(), g_half_tiles.load()}; }

}  // namespace pagedinfer
