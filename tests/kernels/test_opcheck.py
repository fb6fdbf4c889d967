"""torch.library.opcheck on every op with one small valid input: the schemas are honest (what is
written is declared Tensor(a!), nothing else changes), and the fake kernels trace."""

from __future__ import annotations

import pytest
import torch

from pagedinfer import _ops
from tests.kernels.reference import cos_sin_cache
from tests.kernels.utils import make_paged_inputs, randn


def samples(device: str) -> dict[str, tuple]:
    dtype = torch.bfloat16
    inputs = make_paged_inputs([(5, 3), (20, 1), (0, 2)], num_heads=4, num_kv_heads=2, head_size=64,
                               block_size=16, dtype=dtype, device=device)
    workspace = _ops.paged_attention_workspace(3, 4, 2, 64, inputs.block_tables.shape[1], 16, device)
    key, value = randn(6, 2, 64, dtype=dtype, device=device), randn(6, 2, 64, dtype=dtype, device=device)
    pool = [randn(2, 8, 16, 2, 64, dtype=dtype, device=device) for _ in range(2)]
    # opcheck's schema test clones its inputs, and a clone of pinned memory is not pinned: on CUDA the
    # swap target is a second GPU pool (GPU<->pinned swaps are covered in test_cache_ops.py).
    swap_pool = [randn(2, 4, 16, 2, 64, dtype=dtype, device=device) for _ in range(2)]
    pairs = torch.tensor([[1, 3], [6, 0]], dtype=torch.int64)
    x = randn(5, 128, dtype=dtype, device=device)
    weight = randn(128, dtype=dtype, device=device)
    return {
        "paged_attention": (torch.empty_like(inputs.query), inputs.query, inputs.kv_cache, *inputs.metadata,
                            inputs.max_query_len, 0.125, -1, workspace),
        "reshape_and_cache": (key, value, inputs.kv_cache.clone(), inputs.slot_mapping),
        "copy_blocks": ([c.clone() for c in pool], pairs),
        "swap_blocks": (pool, swap_pool, torch.tensor([[7, 2], [0, 3]], dtype=torch.int64)),
        "rms_norm": (torch.empty_like(x), x, weight, 1e-6),
        "fused_add_rms_norm": (x.clone(), randn(5, 128, dtype=dtype, device=device), weight, 1e-6),
        "rotary_embedding": (torch.tensor([0, 3, 99, 7, 50], device=device),
                             randn(5, 4 * 64, dtype=dtype, device=device),
                             randn(5, 2 * 64, dtype=dtype, device=device), 64,
                             cos_sin_cache(100, 32, dtype=dtype).to(device), True),
        "silu_and_mul": (torch.empty(5, 64, dtype=dtype, device=device), x),
    }


OPS = [
    "paged_attention", "reshape_and_cache", "copy_blocks", "swap_blocks", "rms_norm",
    "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, name):
    torch.library.opcheck(getattr(torch.ops.pagedinfer, name).default, samples(device)[name])
