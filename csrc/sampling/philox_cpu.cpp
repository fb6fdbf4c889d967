// philox_uniform on the CPU: rows in parallel, each filled 4 columns (one Philox call) at a time.
#include <ATen/Parallel.h>

#include <algorithm>

#include "ops.h"
#include "sampling/philox.cuh"
#include "sampling/philox_args.h"

namespace pagedinfer {

void philox_uniform_cpu(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& offsets) {
  check_philox_uniform_args(out, seeds, offsets);
  const int64_t num_rows = out.size(0), num_columns = out.size(1);
  float* data = out.data_ptr<float>();
  const int64_t* seed = seeds.data_ptr<int64_t>();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* dst = data + row * num_columns;
      for (int64_t column = 0; column < num_columns; column += 4) {
        float u[4];
        sampling::philox_uniform4(uint64_t(seed[row]), uint64_t(offset[row]), uint64_t(column / 4), u);
        std::copy_n(u, std::min<int64_t>(4, num_columns - column), dst + column);
      }
    }
  });
}

}  // namespace pagedinfer
