// The one place ops are registered. Schemas say what each op writes (Tensor(a!)) and that in-place
// ops return nothing, so torch.compile and CUDA graphs see them truthfully.
#include <torch/library.h>

#include <Python.h>

#include "ops.h"

// Importing pagedinfer._C runs the static registration below.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(pagedinfer, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor query_start_loc, "
      "Tensor seq_lens, Tensor block_tables, int max_query_len, float scale, int sliding_window, "
      "Tensor(b!)? workspace) -> ()");
  m.def(
      "paged_attention_workspace_size(int num_seqs, int num_heads, int num_kv_heads, int head_size, "
      "int max_blocks_per_seq, int block_size, int device_index) -> int",
      &pagedinfer::paged_attention_workspace_size);
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  m.def("copy_blocks(Tensor(a!)[] kv_caches, Tensor block_mapping) -> ()");
  m.def("swap_blocks(Tensor[] src_caches, Tensor(a!)[] dst_caches, Tensor block_mapping) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("philox_uniform(Tensor(a!) out, Tensor seeds, Tensor offsets) -> ()");
  m.def("set_debug_checks(bool enabled) -> ()", &pagedinfer::set_debug_checks);
  m.def("debug_checks_enabled() -> bool", &pagedinfer::debug_checks_enabled);
  m.def("prefill_launch_counts() -> int[]", &pagedinfer::prefill_launch_counts);
}

TORCH_LIBRARY_IMPL(pagedinfer, CPU, m) {
  m.impl("paged_attention", &pagedinfer::paged_attention_cpu);
  m.impl("reshape_and_cache", &pagedinfer::reshape_and_cache_cpu);
  m.impl("copy_blocks", &pagedinfer::copy_blocks_cpu);
  m.impl("swap_blocks", &pagedinfer::swap_blocks);
  m.impl("rms_norm", &pagedinfer::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &pagedinfer::fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &pagedinfer::rotary_embedding_cpu);
  m.impl("silu_and_mul", &pagedinfer::silu_and_mul_cpu);
  m.impl("philox_uniform", &pagedinfer::philox_uniform_cpu);
}

#ifdef PAGEDINFER_WITH_CUDA
TORCH_LIBRARY_IMPL(pagedinfer, CUDA, m) {
  m.impl("paged_attention", &pagedinfer::paged_attention_cuda);
  m.impl("reshape_and_cache", &pagedinfer::reshape_and_cache_cuda);
  m.impl("copy_blocks", &pagedinfer::copy_blocks_cuda);
  m.impl("swap_blocks", &pagedinfer::swap_blocks);
  m.impl("rms_norm", &pagedinfer::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &pagedinfer::fused_add_rms_norm_cuda);
  m.impl("rotary_embedding", &pagedinfer::rotary_embedding_cuda);
  m.impl("silu_and_mul", &pagedinfer::silu_and_mul_cuda);
  m.impl("philox_uniform", &pagedinfer::philox_uniform_cuda);
}
#endif
