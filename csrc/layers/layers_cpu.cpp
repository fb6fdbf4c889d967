// Norms, rotary embedding and the gated activation on the CPU (float32 arithmetic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "core/index_checks.h"
#include "layers/layer_args.h"
#include "ops.h"

namespace pagedinfer {

namespace {

template <typename T>
void rms_norm_rows(T* out, int64_t out_stride, const T* in, int64_t in_stride, T* residual,
                   int64_t res_stride, const T* weight, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * in_stride;
      T* res = residual ? residual + r * res_stride : nullptr;
      float ss = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        float v = float(x[i]);
        if (res) {  // fused add: the sum is rounded to T as the residual stream keeps it
          res[i] = T(v + float(res[i]));
          v = float(res[i]);
        }
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / float(hidden) + eps);
      const T* src = res ? res : x;
      T* o = out + r * out_stride;
      // As HF's LlamaRMSNorm: normalize in float32, round to T, then scale by the weight.
      for (int64_t i = 0; i < hidden; ++i) o[i] = T(float(T(float(src[i]) * inv)) * float(weight[i]));
    }
  });
}

}  // namespace

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_rms_norm_args(out, input, weight, eps);
  const int64_t hidden = input.size(-1), rows = input.numel() / std::max<int64_t>(hidden, 1);
  if (input.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(out.data_ptr<scalar_t>(), hidden, input.data_ptr<scalar_t>(), row_stride_of(input),
                            nullptr, 0, weight.data_ptr<scalar_t>(), rows, hidden, float(eps));
  });
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(input, residual, weight, eps);
  const int64_t hidden = input.size(-1), rows = input.numel() / std::max<int64_t>(hidden, 1);
  if (input.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    auto* x = input.data_ptr<scalar_t>();
    rms_norm_rows<scalar_t>(x, hidden, x, hidden, residual.data_ptr<scalar_t>(), hidden,
                            weight.data_ptr<scalar_t>(), rows, hidden, float(eps));
  });
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox) {
  const RotaryShape s = check_rotary_args(positions, query, key, head_size, cos_sin_cache);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    PI_CHECK(pos[t] >= 0 && pos[t] < s.max_position, "positions[", t, "] = ", pos[t],
             " is out of range [0, ", s.max_position, ") of cos_sin_cache");
  }
  const int64_t half = s.rot_dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "rotary_embedding_cpu", [&] {
    const scalar_t* cache = cos_sin_cache.data_ptr<scalar_t>();
    auto rotate = [&](scalar_t* head, const scalar_t* cs) {
      for (int64_t i = 0; i < half; ++i) {
        // neox rotates element i with i + half; gptj rotates interleaved pairs (2i, 2i + 1).
        const int64_t a = is_neox ? i : 2 * i, b = is_neox ? i + half : 2 * i + 1;
        const float c = float(cs[i]), sn = float(cs[half + i]);
        const float x = float(head[a]), y = float(head[b]);
        head[a] = scalar_t(x * c - y * sn);
        head[b] = scalar_t(y * c + x * sn);
      }
    };
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    at::parallel_for(0, s.num_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* cs = cache + pos[t] * s.rot_dim;
        for (int64_t h = 0; h < s.num_heads; ++h) rotate(q + t * s.query_stride + h * head_size, cs);
        for (int64_t h = 0; h < s.num_kv_heads; ++h) rotate(k + t * s.key_stride + h * head_size, cs);
      }
    });
  });
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul_args(out, input);
  if (input.numel() == 0) return;
  const int64_t d = out.size(-1), rows = out.numel() / d, in_stride = row_stride_of(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "silu_and_mul_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < d; ++i) {
          const float g = float(in[r * in_stride + i]), u = float(in[r * in_stride + d + i]);
          // As HF: silu(gate) rounded to the dtype, then multiplied by up.
          o[r * d + i] = scalar_t(float(scalar_t(g / (1.f + std::exp(-g)))) * u);
        }
      }
    });
  });
}

}  // namespace pagedinfer
