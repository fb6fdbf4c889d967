// philox_uniform on CUDA: one thread per 4 columns (one Philox call makes 4 numbers), rows along
// gridDim.y. The numbers are philox.cuh's, so the same bits as the CPU version.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"
#include "sampling/philox.cuh"
#include "sampling/philox_args.h"

namespace pagedinfer {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridRows = 65535;  // gridDim.y's limit; rows beyond it are looped over

// kVec4: rows start 16-byte aligned and num_columns % 4 == 0, so each thread stores one float4 and a
// warp writes 512 contiguous bytes; otherwise scalar stores, bounds-checked at the row's end.
template <bool kVec4>
__global__ void philox_uniform_kernel(float* __restrict__ out,               // [num_rows, num_columns]
                                      const int64_t* __restrict__ seeds,     // [num_rows]
                                      const int64_t* __restrict__ offsets,   // [num_rows]
                                      int64_t num_rows, int64_t num_columns) {
  const int64_t group = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t column = group * 4;
  if (column >= num_columns) return;
  for (int64_t row = blockIdx.y; row < num_rows; row += gridDim.y) {
    float u[4];
    sampling::philox_uniform4(uint64_t(seeds[row]), uint64_t(offsets[row]), uint64_t(group), u);
    float* dst = out + row * num_columns + column;
    if constexpr (kVec4) {
      *reinterpret_cast<float4*>(dst) = make_float4(u[0], u[1], u[2], u[3]);
    } else {
      for (int i = 0; i < 4 && column + i < num_columns; ++i) dst[i] = u[i];
    }
  }
}

}  // namespace

void philox_uniform_cuda(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& offsets) {
  check_philox_uniform_args(out, seeds, offsets);
  const int64_t num_rows = out.size(0), num_columns = out.size(1);
  if (out.numel() == 0) return;
  const int64_t groups = (num_columns + 3) / 4;
  const dim3 grid(unsigned((groups + kThreads - 1) / kThreads), unsigned(std::min(num_rows, kMaxGridRows)));
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec4 = num_columns % 4 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(out.data_ptr<float>(), seeds.data_ptr<int64_t>(),
                                         offsets.data_ptr<int64_t>(), num_rows, num_columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec4) {
    launch(philox_uniform_kernel<true>);
  } else {
    launch(philox_uniform_kernel<false>);
  }
}

}  // namespace pagedinfer
