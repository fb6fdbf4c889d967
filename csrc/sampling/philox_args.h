// The philox_uniform contract (ops.h), checked once for the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "core/checks.h"

namespace pagedinfer {

// out[num_rows, num_columns] float32 contiguous; seeds, offsets [num_rows] int64 on out's device.
inline void check_philox_uniform_args(const at::Tensor& out, const at::Tensor& seeds, const at::Tensor& offsets) {
  check_dim(out, 2, "out");
  check_dtype(out, at::kFloat, "out");
  check_contiguous(out, "out");
  for (auto [t, name] : {std::pair{&seeds, "seeds"}, std::pair{&offsets, "offsets"}}) {
    check_dim(*t, 1, name);
    check_dtype(*t, at::kLong, name);
    check_contiguous(*t, name);
    check_same_device(*t, out, name, "out");
    PI_CHECK(t->size(0) == out.size(0), name, " has ", t->size(0), " elements but out has ", out.size(0), " rows");
  }
}

}  // namespace pagedinfer
