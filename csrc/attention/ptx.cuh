// Thin wrappers over the PTX instructions the attention kernels use (sm_80+): asynchronous copies into
// shared memory, ldmatrix, the m16n8k16 tensor-core MMA, exp2 and 1/x, and the fp16/bf16 <-> fp32 conversions.
// No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/float_convert.cuh"

#include <cstdint>

namespace pagedinfer::attention {

// Two floats as one 32-bit register of two 16-bit values, `lo` in the low half: the element order of
// every mma.sync fragment (the lower column index sits in the lower half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^x on the special-function unit. exp2(-inf) = +0, which the online softmax relies on for masked keys
// and for the first rescale (running max still -inf).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1/x on the special-function unit (~1 ulp): one MUFU, where 1.f / x or __frcp_rn add a Newton step and a
// slow path for denormals.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- asynchronous copies (cp.async) ------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared without passing through registers; when `valid` is false it reads
// nothing and writes 16 zero bytes (src-size 0), so rows past the sequence or outside the window become
// zeros rather than stale cache contents (which may be NaN and would poison P·V even with P = 0).
// .cg: cache in L2 only; K/V are streamed once.
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  cp_async_16(smem_address(smem_dst), gmem_src, valid);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- ldmatrix and mma.sync ---------------------------------------------------------------------------

// Four 8x8 matrices of 16-bit elements; lane l gives the address of row (l % 8) of matrix (l / 8).
// Lane l receives, of each matrix, row l / 4, columns 2 * (l % 4) and +1 (one register per matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row))
               : "memory");
}

// Same, transposed: lane l receives rows 2 * (l % 4) and +1 of column l / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row))
               : "memory");
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulators. Fragments (g = lane / 4, t = lane % 4):
//   a[0]: (row g,   cols 2t, 2t+1)   a[1]: (row g+8, cols 2t, 2t+1)
//   a[2]: (row g,   cols 2t+8, +9)   a[3]: (row g+8, cols 2t+8, +9)
//   b0: (rows 2t, 2t+1 of col g)     b1: (rows 2t+8, 2t+9 of col g)
//   c[0], c[1]: (row g, cols 2t, 2t+1)   c[2], c[3]: (row g+8, cols 2t, 2t+1)
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragments of m16n8k16 over a whole head (kKSteps steps of 16 dims) for this lane's two rows:
// row g from `lo`, row g + 8 from `hi` (t = lane % 4). A row that is not `ok` gives zeros. 16-bit loads:
// a query row stride need not keep pairs 4-byte aligned, and Q is read once per CTA.
template <int kKSteps>
__device__ __forceinline__ void load_a_fragments(uint32_t (&frag)[kKSteps][4], const uint16_t* lo, bool lo_ok,
                                                 const uint16_t* hi, bool hi_ok, int t) {
  auto pair = [](const uint16_t* r, int col, bool ok) -> uint32_t {
    return ok ? uint32_t(r[col]) | (uint32_t(r[col + 1]) << 16) : 0u;
  };
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    const int col = ks * 16 + 2 * t;
    frag[ks][0] = pair(lo, col, lo_ok);
    frag[ks][1] = pair(hi, col, hi_ok);
    frag[ks][2] = pair(lo, col + 8, lo_ok);
    frag[ks][3] = pair(hi, col + 8, hi_ok);
  }
}

// ---- programmatic dependent launch (sm_90) -------------------------------------------------------------

// Lets the next kernel in the stream, when launched as a programmatic dependent, start its CTAs (and their
// prologue) while this grid still runs. It must still call wait_for_prerequisite_grids() before reading
// this grid's results. No-op before sm_90, or when the next launch is an ordinary one.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits until the grids this one depends on have completed and their writes are visible. Returns at once
// for an ordinary launch (stream order already holds) and before sm_90.
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---- warp reductions ---------------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace pagedinfer::attention
