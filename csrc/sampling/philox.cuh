// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator. Output = a keyed bijection of the counter, so any element of the stream is computed
// directly, in any order, on any thread. The CPU (philox_cpu.cpp) and CUDA (philox.cu) launchers share
// these functions; integer arithmetic and an exact float conversion give the same bits on both.
// No torch headers.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PI_HOST_DEVICE inline
#endif

namespace pagedinfer::sampling {

struct Philox4 {
  uint32_t v[4];
};

// The round multipliers and the key schedule's increments (the golden ratio and sqrt(3) - 1).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

PI_HOST_DEVICE Philox4 philox_round(const Philox4& c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = uint64_t(kPhiloxM0) * c.v[0];  // hi and lo halves of one 32x32 -> 64 product
  const uint64_t p1 = uint64_t(kPhiloxM1) * c.v[2];
  return {{uint32_t(p1 >> 32) ^ c.v[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c.v[3] ^ k1, uint32_t(p0)}};
}

// Ten rounds, the key bumped by the Weyl increments between them.
PI_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    counter = philox_round(counter, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return counter;
}

// A uint32 to a uniform in the open interval (0, 1): the top 23 bits k give (2k + 1) / 2^24, an odd
// integer below 2^24 times a power of two, so the conversion is exact (identical on every device) and
// neither 0 nor 1 can come out: -log(u) is finite and > 0.
PI_HOST_DEVICE float uniform_open01(uint32_t x) { return float(2u * (x >> 9) + 1u) * 0x1p-24f; }

// The uniforms of columns [4 * group, 4 * group + 4) of the row (seed, offset): key = seed,
// counter = (group, offset), so every (seed, offset, column) has its own number.
PI_HOST_DEVICE void philox_uniform4(uint64_t seed, uint64_t offset, uint64_t group, float out[4]) {
  const Philox4 counter = {{uint32_t(group), uint32_t(group >> 32), uint32_t(offset), uint32_t(offset >> 32)}};
  const Philox4 bits = philox4x32_10(counter, uint32_t(seed), uint32_t(seed >> 32));
  for (int i = 0; i < 4; ++i) out[i] = uniform_open01(bits.v[i]);
}

}  // namespace pagedinfer::sampling
