// Thin wrappers over the warpgroup MMA instructions of sm_90a (wgmma.mma_async and its fences), the
// shared-memory matrix descriptor they read operands through, and the proxy fence that orders ordinary
// (generic-proxy) shared-memory writes, cp.async included, before wgmma's (async-proxy) reads.
// Also the mbarrier, register-reallocation and stmatrix primitives of the warp-specialized kernel. No torch
// headers.
//
// PAGEDINFER_WGMMA is 1 only in a device pass that targets sm_90a (or compute_90a PTX): wgmma exists
// nowhere else. Elsewhere the wrappers compile to nothing and the kernel that uses them traps; the
// launcher routes to it only on a compute-capability 9.0 device whose loaded code is sm_90a.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PAGEDINFER_WGMMA 1
#else
#define PAGEDINFER_WGMMA 0
#endif

namespace pagedinfer::attention {

// Matrix descriptor of a shared-memory operand laid out in the 128-byte-swizzle canonical form: rows of
// 128 bytes (64 16-bit elements), in atoms of 8 rows (1024 bytes, 1024-aligned) where the 16-byte chunk c
// of row r sits at chunk position c ^ (r % 8). Fields (PTX ISA, "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4     bits 16-29  leading byte offset >> 4
//   bits 32-45  stride byte offset >> 4   bits 49-51  base offset (0: atoms 1024-aligned)
//   bits 62-63  swizzle mode (1: 128-byte)
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return uint64_t((smem_addr & 0x3FFFFu) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}

// A run of operands of one layout, as its descriptor's two words: the low word (start address and leading
// byte offset) moves from operand to operand, the high word (stride, swizzle) is a compile-time constant.
// Built by a whole warpgroup from a warp-uniform address: the low word is broadcast from lane 0 by a
// shuffle, which ptxas knows to be uniform, so the run lives in uniform registers and each descriptor is
// one uniform add (from a per-thread value, every descriptor costs two R2UR moves, with their latency in
// front of its wgmma). Made where it is used, so it is not hoisted out of the caller's loop either.
struct WgmmaDescRun {
  uint32_t lo, hi;
  __device__ __forceinline__ WgmmaDescRun(uint32_t smem_addr, uint32_t leading_bytes, uint32_t stride_bytes) {
    const uint64_t d = wgmma_desc_sw128(smem_addr, leading_bytes, stride_bytes);
    lo = __shfl_sync(0xffffffffu, uint32_t(d), 0);
    hi = uint32_t(d >> 32);
  }
  // The operand `bytes` further on: only the start address field moves; a shared-memory address fits it,
  // so the add never carries out of the field.
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const { return (uint64_t(hi) << 32) | (lo + (bytes >> 4)); }
};

// Orders this thread's earlier register accesses before the wgmma operations that follow (required
// before the first wgmma of a batch whose accumulator or A registers other instructions touched).
__device__ __forceinline__ void wgmma_fence() {
#if PAGEDINFER_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if PAGEDINFER_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most kPending committed wgmma groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if PAGEDINFER_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Generic-proxy writes to shared memory (st.shared, cp.async) made before this fence are ordered before
// async-proxy reads (wgmma operands) that a later barrier orders after it.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if PAGEDINFER_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accesses of an accumulator register across the wgmma issue / wait
// (the asm statements only tell it the registers are written at issue time).
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// ---- mbarriers, named barriers, register reallocation (the warp-specialized kernel's synchronization) -----

// A shared-memory mbarrier expecting `count` arrivals per phase. Initialized by one thread, then published
// to the CTA by a __syncthreads.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
#if PAGEDINFER_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

// One arrival (release: this thread's earlier shared-memory writes are visible to whoever waits).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if PAGEDINFER_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// One arrival made when every cp.async this thread issued so far has landed (the count must include it:
// .noinc does not add a pending arrival).
__device__ __forceinline__ void mbarrier_arrive_on_cp_async(uint32_t bar) {
#if PAGEDINFER_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}

// One arrival that also makes the phase wait for `bytes` more of asynchronous (TMA) writes.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if PAGEDINFER_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// The box at (c0, c1, c2) of a 3-D tensor map into shared memory at `dst` (TMA); its bytes complete on
// `bar`'s transaction count. `map`: a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint32_t bar) {
#if PAGEDINFER_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#endif
}

// Waits until the phase of parity `parity` has completed (acquire). A fresh barrier is in phase 0, so
// waiting on parity 1 returns at once: that is how a producer finds every slot free the first time.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if PAGEDINFER_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// Does `pred` hold for any of the kThreads threads (whole warps) that meet at named barrier `id`? All of
// them get the answer, so a branch on it is uniform among them (a wgmma inside one needs that).
template <int kThreads>
__device__ __forceinline__ bool barrier_any(int id, bool pred) {
  uint32_t any = 0;
#if PAGEDINFER_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred vote, result;\n"
      "setp.ne.u32 vote, %1, 0;\n"
      "bar.red.or.pred result, %2, %3, vote;\n"
      "selp.u32 %0, 1, 0, result;\n"
      "}\n"
      : "=r"(any)
      : "r"(uint32_t(pred)), "r"(id), "n"(kThreads)
      : "memory");
#endif
  return any != 0;
}

// Gives this warpgroup's registers back (producer) or takes them (consumers): all warps of a warpgroup
// execute the same one. kRegs: a multiple of 8 in [24, 256].
template <int kRegs>
__device__ __forceinline__ void warpgroup_release_registers() {
#if PAGEDINFER_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void warpgroup_claim_registers() {
#if PAGEDINFER_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// ---- the MMAs: m64nNk16 with fp32 accumulators, N = 64 or 128 ----------------------------------------------
// Wgmma<T, N>::ss        d += A[64 x 16] * B[16 x N], A and B in shared memory, both K-major
// Wgmma<T, N>::ss_first  d = A * B (d written only: the compiler need not keep or initialize it)
// Wgmma<T, N>::rs_tn     d += A * B (d = A * B where accumulate is 0: d need not be initialized), A from
//                        registers (the m16n8k16 A fragment of the thread's warp's 16 rows: a[0] (row g,
//                        k 2t..2t+1), a[1] (row g+8, ..), a[2] (row g, k 2t+8..), a[3] (row g+8, k 2t+8..)),
//                        B in shared memory MN-major (tnspB = 1: N contiguous)
// d: N / 2 floats per thread; element 4j + e is row g + 8 (e / 2) of the warp's 16, column 8j + 2t + e % 2.
template <typename T, int N>
struct Wgmma;

#define PI_REGS_32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PI_REGS_64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define PI_ACC_32(c, d) c(d[0]), c(d[1]), c(d[2]), c(d[3]), c(d[4]), c(d[5]), c(d[6]), c(d[7]), c(d[8]), c(d[9]), c(d[10]), c(d[11]), c(d[12]), c(d[13]), c(d[14]), c(d[15]), c(d[16]), c(d[17]), c(d[18]), c(d[19]), c(d[20]), c(d[21]), c(d[22]), c(d[23]), c(d[24]), c(d[25]), c(d[26]), c(d[27]), c(d[28]), c(d[29]), c(d[30]), c(d[31])
#define PI_ACC_64(c, d) PI_ACC_32(c, d), c(d[32]), c(d[33]), c(d[34]), c(d[35]), c(d[36]), c(d[37]), c(d[38]), c(d[39]), c(d[40]), c(d[41]), c(d[42]), c(d[43]), c(d[44]), c(d[45]), c(d[46]), c(d[47]), c(d[48]), c(d[49]), c(d[50]), c(d[51]), c(d[52]), c(d[53]), c(d[54]), c(d[55]), c(d[56]), c(d[57]), c(d[58]), c(d[59]), c(d[60]), c(d[61]), c(d[62]), c(d[63])

#if PAGEDINFER_WGMMA
// SHAPE: "m64n64k16" or "m64n128k16"; REGS / ACC: its accumulator list; A, B, P: the operand numbers of the
// A descriptor (or first A register), the B descriptor and the scale-d predicate's source.
#define PI_WGMMA_SS(SHAPE, PTX, REGS, ACC, C, A, B, P, SCALE_D)                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                                              \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." PTX "." PTX " " REGS ", %" A ", %" B              \
               ", p, 1, 1, 0, 0;\n}\n"                                                                     \
               : ACC(C, d)                                                                                 \
               : "l"(desc_a), "l"(desc_b), "r"(SCALE_D))
#define PI_WGMMA_RS_TN(SHAPE, PTX, REGS, ACC, A0, A1, A2, A3, B, P)                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                                              \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." PTX "." PTX " " REGS ", {%" A0 ", %" A1           \
               ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, 1;\n}\n"                                             \
               : ACC("+f", d)                                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))
#else
#define PI_WGMMA_SS(...)
#define PI_WGMMA_RS_TN(...)
#endif

// One shape's specialization: N its width, REGS / ACC its N / 2 accumulators, D0 .. D5 the operand numbers
// that follow them ("32" .. "37" for N = 64).
#define PI_DEFINE_WGMMA_SHAPE(T, PTX, N, SHAPE, REGS, ACC, D0, D1, D2, D3, D4, D5)                             \
  template <>                                                                                                \
  struct Wgmma<T, N> {                                                                                       \
    static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {          \
      PI_WGMMA_SS(SHAPE, PTX, REGS, ACC, "+f", D0, D1, D2, 1);                                               \
    }                                                                                                        \
    static __device__ __forceinline__ void ss_first(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {    \
      PI_WGMMA_SS(SHAPE, PTX, REGS, ACC, "=f", D0, D1, D2, 0);                                               \
    }                                                                                                        \
    static __device__ __forceinline__ void rs_tn(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,   \
                                                 int accumulate = 1) {                                       \
      PI_WGMMA_RS_TN(SHAPE, PTX, REGS, ACC, D0, D1, D2, D3, D4, D5);                                         \
    }                                                                                                        \
  };
#define PI_DEFINE_WGMMA(T, PTX)                                                                              \
  PI_DEFINE_WGMMA_SHAPE(T, PTX, 64, "m64n64k16", PI_REGS_32, PI_ACC_32, "32", "33", "34", "35", "36", "37")   \
  PI_DEFINE_WGMMA_SHAPE(T, PTX, 128, "m64n128k16", PI_REGS_64, PI_ACC_64, "64", "65", "66", "67", "68", "69")

PI_DEFINE_WGMMA(__nv_bfloat16, "bf16")
PI_DEFINE_WGMMA(__half, "f16")

#undef PI_DEFINE_WGMMA
#undef PI_DEFINE_WGMMA_SHAPE
#undef PI_WGMMA_SS
#undef PI_WGMMA_RS_TN
#undef PI_ACC_64
#undef PI_ACC_32
#undef PI_REGS_64
#undef PI_REGS_32

// ---- the 128-byte-swizzle canonical layout the operands use, and the build probe ---------------------------

// Byte offset of 16-byte chunk `chunk` (0 .. kHeadSize / 8 - 1) of row `row` in a [half][rows][64] region
// of `half_bytes` per half: the 128-byte-swizzle canonical layout.
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk, int half_bytes) {
  return uint32_t((chunk >> 3) * half_bytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Four 8x8 matrices of 16-bit elements into shared memory (stmatrix, sm_90; ldmatrix's inverse): lane l
// gives the address of row l % 8 of matrix l / 8 and holds, of each matrix, row l / 4, columns 2 (l % 4)
// and + 1, the layout of an accumulator's 8-column block.
__device__ __forceinline__ void stmatrix_x4(uint32_t smem_row_addr, const uint32_t (&r)[4]) {
#if PAGEDINFER_WGMMA
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_row_addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#endif
}

// Tells the host whether the device code it would run was built with wgmma (sm_90a / compute_90a) or
// without (a plain sm_90 or older target, where the prefill kernel traps): only the wgmma build gives this
// kernel kWgmmaProbeSmemBytes of static shared memory, which cudaFuncGetAttributes reports without a launch
// (so the check is also legal during CUDA-graph capture). Never launched.
constexpr int kWgmmaProbeSmemBytes = 2048;
__global__ void wgmma_build_probe_kernel(int* out) {
#if PAGEDINFER_WGMMA
  __shared__ volatile int marker[kWgmmaProbeSmemBytes / 4];
  marker[threadIdx.x % (kWgmmaProbeSmemBytes / 4)] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = marker[(threadIdx.x + 1) % (kWgmmaProbeSmemBytes / 4)];
#else
  if (out == nullptr) __trap();
#endif
}

}  // namespace pagedinfer::attention
