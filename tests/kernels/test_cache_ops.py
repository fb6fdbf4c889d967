"""reshape_and_cache, copy_blocks, swap_blocks: bit-exact against the references, whole caches compared
(so that a write to the wrong block or slot shows up as well as a missing one)."""

from __future__ import annotations

import pytest
import torch

from pagedinfer import _ops
from tests.kernels.reference import (ref_copy_blocks, ref_paged_attention, ref_reshape_and_cache,
                                     ref_swap_blocks)
from tests.kernels.utils import (FLOAT_DTYPES, assert_close_to_ref, cdiv, distinct_blocks, randn,
                                 row_strided)


def random_cache(num_blocks: int, block_size: int = 16, num_kv_heads: int = 4, head_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                 pin_memory: bool = False) -> torch.Tensor:
    cache = randn(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype, device=device)
    return cache.pin_memory() if pin_memory else cache


def block_mapping(pairs: list[tuple[int, int]], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.int64, device=device).reshape(-1, 2)


# ---- reshape_and_cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_kv_heads, head_size, block_size",
                         [(1, 64, 16), (8, 128, 16), (3, 80, 8), (2, 256, 32)])
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 100])
def test_reshape_and_cache(device, num_tokens, num_kv_heads, head_size, block_size, dtype):
    num_blocks = 2 * cdiv(num_tokens, block_size) + 3  # room to scatter the tokens
    cache = random_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device)
    # key and value as row views of a wider qkv buffer, as the engine passes them.
    key = row_strided(num_tokens, (num_kv_heads, head_size), dtype, device)
    value = row_strided(num_tokens, (num_kv_heads, head_size), dtype, device)
    # Distinct slots anywhere in the pool, in random order; about one token in four is padding.
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[torch.rand(num_tokens) < 0.25] = -1
    slot_mapping = slots.to(device)

    expected = cache.clone()
    ref_reshape_and_cache(key, value, expected, slot_mapping)
    _ops.reshape_and_cache(key, value, cache, slot_mapping)
    assert torch.equal(cache, expected)


# ---- copy_blocks --------------------------------------------------------------------------------------

def copy_pairs(kind: str, num_blocks: int) -> list[tuple[int, int]]:
    """Pairs whose destinations are distinct and never a source (a copy-on-write fork), so the
    result does not depend on the order the pairs are processed in."""
    if kind == "none":
        return []
    if kind == "one":
        src, dst = distinct_blocks(num_blocks, 2)
        return [(src, dst)]
    if kind == "many":
        ids = distinct_blocks(num_blocks, 18)
        return list(zip(ids[:9], ids[9:]))
    if kind == "fan_out":  # one parent block forked into several children
        src, *dsts = distinct_blocks(num_blocks, 6)
        return [(src, dst) for dst in dsts]
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["none", "one", "many", "fan_out"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_copy_blocks(device, num_layers, kind, dtype):
    caches = [random_cache(37, 16, 4, 64, dtype, device) for _ in range(num_layers)]
    mapping = block_mapping(copy_pairs(kind, 37))
    expected = [c.clone() for c in caches]
    ref_copy_blocks(expected, mapping)
    _ops.copy_blocks(caches, mapping)
    for layer, (got, want) in enumerate(zip(caches, expected)):
        assert torch.equal(got, want), f"layer {layer}"


@pytest.mark.gpu
def test_copy_blocks_mapping_on_device():
    # The contract allows block_mapping on the caches' device as well as on the CPU.
    caches = [random_cache(29, 32, 8, 128, torch.float16, "cuda") for _ in range(4)]
    mapping = block_mapping(copy_pairs("many", 29), device="cuda")
    expected = [c.clone() for c in caches]
    ref_copy_blocks(expected, mapping)
    _ops.copy_blocks(caches, mapping)
    assert all(torch.equal(g, w) for g, w in zip(caches, expected))


# ---- swap_blocks --------------------------------------------------------------------------------------

SWAP_DIRECTIONS = [
    pytest.param("cpu", "cpu", id="cpu->cpu"),
    pytest.param("cuda", "cpu", marks=pytest.mark.gpu, id="gpu->pinned"),
    pytest.param("cpu", "cuda", marks=pytest.mark.gpu, id="pinned->gpu"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_pairs", [0, 1, 7])
@pytest.mark.parametrize("src_device, dst_device", SWAP_DIRECTIONS)
def test_swap_blocks(src_device, dst_device, num_pairs, dtype):
    # Pools of different sizes (the CPU swap pool is the smaller one), ids in arbitrary order.
    num_src, num_dst, num_layers = 23, 11, 3
    pinned = src_device != dst_device  # the CPU side of a GPU swap is pinned, as the engine allocates it
    src = [random_cache(num_src, 16, 2, 128, dtype, src_device, pinned and src_device == "cpu")
           for _ in range(num_layers)]
    dst = [random_cache(num_dst, 16, 2, 128, dtype, dst_device, pinned and dst_device == "cpu")
           for _ in range(num_layers)]
    mapping = block_mapping(list(zip(distinct_blocks(num_src, num_pairs), distinct_blocks(num_dst, num_pairs))))
    src_before = [c.clone() for c in src]
    expected = [c.clone() for c in dst]
    ref_swap_blocks(src, expected, mapping)
    _ops.swap_blocks(src, dst, mapping)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copy may be asynchronous with respect to the host
    for layer in range(num_layers):
        assert torch.equal(dst[layer], expected[layer]), f"layer {layer}"
        assert torch.equal(src[layer], src_before[layer]), f"source of layer {layer} changed"


# ---- CUDA only: one layer of more than 2^31 elements -------------------------------------------------

@pytest.mark.gpu
def test_int64_offsets_in_a_large_layer():
    """A bf16 layer of just over 2^32 elements (8.6 GB): element offsets of the top blocks, in K as
    well as in V, do not fit in int32. Write there, read back through attention, copy across the top."""
    block_size, num_kv_heads, head_size = 16, 8, 128
    per_block = block_size * num_kv_heads * head_size
    num_blocks = 2**31 // per_block + 64
    assert (num_blocks - 3) * per_block >= 2**31  # the top three K blocks start past int32
    nbytes = 2 * num_blocks * per_block * 2
    if torch.cuda.mem_get_info()[0] < 2.5 * nbytes:  # the cache and a clone of it, plus slack
        pytest.skip(f"needs {2.5 * nbytes / 2**30:.0f} GiB of free GPU memory")
    dtype, device = torch.bfloat16, "cuda"
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype, device=device)

    # One sequence of 40 tokens in the top three blocks (random order), written by reshape_and_cache.
    seq_len, top = 40, torch.randperm(3) + num_blocks - 3
    positions = torch.arange(seq_len)
    slot_mapping = (top[positions // block_size] * block_size + positions % block_size).to(device)
    key = torch.randn(seq_len, num_kv_heads, head_size, dtype=dtype, device=device)
    value = torch.randn(seq_len, num_kv_heads, head_size, dtype=dtype, device=device)
    _ops.reshape_and_cache(key, value, cache, slot_mapping)
    flat = cache.view(2, -1, num_kv_heads, head_size)
    assert torch.equal(flat[0, slot_mapping], key) and torch.equal(flat[1, slot_mapping], value)
    assert int(torch.count_nonzero(cache[:, :num_blocks - 3])) == 0  # nothing written elsewhere (wrapped)

    # Attention reads them back: a decode (split-KV path) and a 9-token chunk (tiled path).
    block_tables = torch.zeros(1, 4, dtype=torch.int32)
    block_tables[0, :3] = top
    for q_len in (1, 9):
        query = torch.randn(q_len, 4 * num_kv_heads, head_size, dtype=dtype, device=device)
        metadata = (torch.tensor([0, q_len], dtype=torch.int32, device=device),
                    torch.tensor([seq_len], dtype=torch.int32, device=device),
                    block_tables.to(device))
        out = torch.full_like(query, float("nan"))
        _ops.paged_attention(out, query, cache, *metadata, q_len, head_size**-0.5, -1, None)
        assert_close_to_ref(out, lambda d: ref_paged_attention(query, cache, *metadata, head_size**-0.5,
                                                               dtype=d), dtype, name=f"q_len {q_len}")

    # copy_blocks across the top, both ways: top -> bottom and bottom -> top.
    mapping = block_mapping([(int(top[0]), 5), (2, num_blocks - 10), (int(top[2]), 3)])
    expected = cache.clone()
    ref_copy_blocks([expected], mapping)
    _ops.copy_blocks([cache], mapping)
    assert torch.equal(cache, expected)
