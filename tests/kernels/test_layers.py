"""rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul against their references."""

from __future__ import annotations

import math

import pytest
import torch

from pagedinfer import _ops
from tests.kernels.reference import (cos_sin_cache, ref_fused_add_rms_norm, ref_rms_norm,
                                     ref_rotary_embedding, ref_silu_and_mul)
from tests.kernels.utils import FLOAT_DTYPES, assert_close_to_ref, per_device, randn, row_strided

HIDDEN_SIZES = per_device(cpu=[1, 7, 64, 4096], cuda=[1, 7, 64, 4096, 5120, 8192, 8200])
EPS = 1e-6
LAYOUTS = pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row_strided"])


def rows(leading: tuple[int, ...], width: int, dtype: torch.dtype, device: str,
         strided: bool) -> torch.Tensor:
    """Random [*leading, width]; strided: the rows of a wider buffer (e.g. a slice of a fused
    projection), the leading dims still collapsing into one row index."""
    num_rows = math.prod(leading)
    if strided:
        x = row_strided(num_rows, (width,), dtype, device)
    else:
        x = randn(num_rows, width, dtype=dtype, device=device)
    return x.view(*leading, width)


def norm_inputs(num_tokens: int, hidden: int, dtype: torch.dtype, device: str, strided: bool = False):
    # Magnitude 4: a sum of squares over 4096 values then passes float16's 65504, so a kernel
    # accumulating in the storage type overflows. (Scaled in place, exactly: keeps the strides.)
    x = rows((num_tokens,), hidden, dtype, device, strided).mul_(4)
    weight = 1 + 0.1 * randn(hidden, dtype=torch.float32, device=device)
    return x, weight.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@LAYOUTS
@pytest.mark.parametrize("num_tokens", [0, 1, 17])
@pytest.mark.parametrize("device, hidden", HIDDEN_SIZES)
def test_rms_norm(device, hidden, num_tokens, strided, dtype):
    x, weight = norm_inputs(num_tokens, hidden, dtype, device, strided)
    x_before = x.clone()
    out = _ops.rms_norm(x, weight, EPS)
    assert torch.equal(x, x_before)
    assert_close_to_ref(out, lambda d: ref_rms_norm(x, weight, EPS, dtype=d), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17])
@pytest.mark.parametrize("device, hidden", HIDDEN_SIZES)
def test_fused_add_rms_norm(device, hidden, num_tokens, dtype):
    x, weight = norm_inputs(num_tokens, hidden, dtype, device)
    residual = randn(num_tokens, hidden, dtype=dtype, device=device)
    x_in, residual_in = x.clone(), residual.clone()
    _ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert_close_to_ref(residual, lambda d: ref_fused_add_rms_norm(x_in, residual_in, weight, EPS, d)[1],
                        dtype, name="residual")
    assert_close_to_ref(x, lambda d: ref_fused_add_rms_norm(x_in, residual_in, weight, EPS, d)[0],
                        dtype, name="normed")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("heads_dim", [False, True], ids=["flat", "3d"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
# (64, 20): half a rot_dim of 10 fits no vector width, so CUDA takes its scalar path.
@pytest.mark.parametrize("head_size, rot_dim", [(64, 64), (128, 128), (128, 64), (80, 32), (256, 256),
                                                (64, 20)])
@pytest.mark.parametrize("num_tokens", [0, 1, 33])
def test_rotary_embedding(device, num_tokens, head_size, rot_dim, is_neox, heads_dim, dtype):
    num_heads, num_kv_heads, max_position = 8, 2, 4096
    # query and key as column slices of one qkv row, as the model passes them: [num_tokens, heads *
    # head_size], or the same memory viewed [num_tokens, heads, head_size].
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype, device=device)
    q_end, k_end = num_heads * head_size, (num_heads + num_kv_heads) * head_size
    query, key = qkv[:, :q_end], qkv[:, q_end:k_end]
    positions = torch.randint(0, max_position, (num_tokens,))
    positions[:2] = torch.tensor([0, max_position - 1])[:num_tokens]  # both ends of the table
    positions = positions.to(device)
    cache = cos_sin_cache(max_position, rot_dim, dtype=dtype).to(device)
    qkv_before = qkv.clone()

    if heads_dim:
        _ops.rotary_embedding(positions, query.view(num_tokens, num_heads, head_size),
                              key.view(num_tokens, num_kv_heads, head_size), head_size, cache, is_neox)
    else:
        _ops.rotary_embedding(positions, query, key, head_size, cache, is_neox)

    q_in, k_in = qkv_before[:, :q_end], qkv_before[:, q_end:k_end]
    for name, got, ref_index in (("query", query, 0), ("key", key, 1)):
        assert_close_to_ref(got, lambda d: ref_rotary_embedding(positions, q_in, k_in, head_size, cache,
                                                                is_neox, d)[ref_index], dtype, name=name)
    # Dims past rot_dim pass through untouched, and so does the rest of the row (v).
    heads_after = qkv[:, :k_end].reshape(num_tokens, num_heads + num_kv_heads, head_size)
    heads_before = qkv_before[:, :k_end].reshape(num_tokens, num_heads + num_kv_heads, head_size)
    assert torch.equal(heads_after[..., rot_dim:], heads_before[..., rot_dim:])
    assert torch.equal(qkv[:, k_end:], qkv_before[:, k_end:])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@LAYOUTS
@pytest.mark.parametrize("leading", [(0,), (1,), (17,), (2, 3)])
@pytest.mark.parametrize("device, d", per_device(cpu=[1, 7, 64, 2048], cuda=[1, 7, 64, 4096, 11008]))
def test_silu_and_mul(device, d, leading, strided, dtype):
    x = rows(leading, 2 * d, dtype, device, strided).mul_(3)  # well into silu's curved part
    out = _ops.silu_and_mul(x)
    assert_close_to_ref(out, lambda dt: ref_silu_and_mul(x, dt), dtype)
