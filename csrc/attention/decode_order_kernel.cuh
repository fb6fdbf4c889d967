// The order in which a decode grid serves its sequences: longest first. A decode grid of more than one wave
// of CTAs starts them in grid order, so a long sequence late in a ragged batch would start last and finish
// alone; started first, the long ones overlap the short ones. One CTA ranks every sequence by counting the
// keys above its own (stable: ties keep index order); the decode kernel, launched as its programmatic
// dependent, reads the order after griddepcontrol.wait. Graph-safe: computed on the device at every launch
// from this step's seq_lens. No torch headers.
#pragma once

#include <climits>
#include <cstdint>

#include "attention/ptx.cuh"

namespace pagedinfer::attention {

constexpr int kMaxOrderedSeqs = 512;  // one thread a sequence; larger batches keep grid order (many waves)

// order[rank] = sequence, rank 0 the longest. Sequences without a decode token (prompt chunks of a mixed
// step, whose decode-grid CTAs exit at once) rank last.
__global__ void __launch_bounds__(kMaxOrderedSeqs)
    decode_order_kernel(const int32_t* query_start_loc, const int32_t* seq_lens, int num_seqs, int32_t* order) {
  __shared__ __align__(16) int keys[kMaxOrderedSeqs];
  allow_dependent_launch();  // the decode grid may take its slots now; it waits for `order` itself
  const int i = threadIdx.x;
  int key = INT_MIN;  // past the batch: never above a real key
  if (i < num_seqs) key = query_start_loc[i + 1] - query_start_loc[i] == 1 ? seq_lens[i] : -1;
  keys[i] = key;
  __syncthreads();
  if (i >= num_seqs) return;
  int rank = 0;
  const int4* keys4 = reinterpret_cast<const int4*>(keys);
  for (int j4 = 0; j4 < (num_seqs + 3) / 4; ++j4) {  // 4 keys a broadcast read
    const int4 k = keys4[j4];
    const int j = 4 * j4;
    rank += (k.x > key || (k.x == key && j < i)) + (k.y > key || (k.y == key && j + 1 < i)) +
            (k.z > key || (k.z == key && j + 2 < i)) + (k.w > key || (k.w == key && j + 3 < i));
  }
  order[rank] = i;
}

}  // namespace pagedinfer::attention
