// Division of non-negative ints by a divisor known only at run time, as a multiply-high, an add and a
// shift (Granlund and Montgomery's round-up method) instead of the ~20 instructions of an integer division.
// Made once (by a thread, before its loop), used per item. No torch headers.
#pragma once

#include <cstdint>

namespace pagedinfer {

struct FastDivisor {
  uint32_t multiplier;  // 2^32 (2^shift - d) / d + 1, < 2^32
  uint32_t shift;       // ceil(log2 d)

  // d >= 1.
  __device__ __forceinline__ explicit FastDivisor(int d) {
    shift = 32u - __clz(uint32_t(d - 1));  // 0 for d = 1
    multiplier = uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(d)) / uint64_t(d) + 1);
  }
  // n / d for 0 <= n < 2^31 (then umulhi(n, m) + n < 2^32).
  __device__ __forceinline__ int div(int n) const {
    return int((__umulhi(uint32_t(n), multiplier) + uint32_t(n)) >> shift);
  }
};

}  // namespace pagedinfer
