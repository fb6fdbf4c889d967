"""Pure-torch references for the ops of pagedinfer._C, written for clarity, not speed.

Contracts are those of csrc/ops.h. Numerical references take ``dtype``: the precision every step is
computed in (inputs are upcast or rounded to it first). Tests run them twice, in float64 and in the
test dtype, to derive how far a kernel may be from the exact answer (see utils.assert_close_to_ref).
Data-movement references mutate their destination in place, like the ops, so that tests can compare
whole caches bit-exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- attention -------------------------------------------------------------------------------------

def token_slot(block_table_row: list[int], position: int, block_size: int) -> int:
    """The cache slot holding a sequence's token at `position`: its physical block, then the offset."""
    return block_table_row[position // block_size] * block_size + position % block_size


def ref_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                        sliding_window: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[num_tokens, num_heads, head_size], computed in `dtype`.

    Sequence i owns query rows [qsl[i], qsl[i+1]); they are the last q_len of its seq_lens[i] tokens.
    Query row at position p attends to the keys at positions (p - window, p] (all of [0, p] if the
    window is off), found by walking the block table token by token. seq_len 0 is a padded row: zeros.
    """
    num_tokens, num_heads, head_size = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    # Token-major view of the pool: slot = block * block_size + offset.
    keys_by_slot = kv_cache[0].reshape(-1, num_kv_heads, head_size)
    values_by_slot = kv_cache[1].reshape(-1, num_kv_heads, head_size)

    out = torch.zeros(num_tokens, num_heads, head_size, dtype=dtype, device=query.device)
    qsl, lens, tables = query_start_loc.tolist(), seq_lens.tolist(), block_tables.tolist()
    for i, seq_len in enumerate(lens):
        if seq_len == 0:
            continue  # padded row
        start, end = qsl[i], qsl[i + 1]
        slots = torch.tensor([token_slot(tables[i], p, block_size) for p in range(seq_len)],
                             device=kv_cache.device)
        # Each query head reads the kv head of its group: kv head h // group.
        k = keys_by_slot[slots].to(dtype).repeat_interleave(group, dim=1)    # [seq_len, H, D]
        v = values_by_slot[slots].to(dtype).repeat_interleave(group, dim=1)  # [seq_len, H, D]
        for row in range(start, end):
            pos = seq_len - (end - start) + (row - start)
            lo = max(0, pos - sliding_window + 1) if sliding_window > 0 else 0
            q = query[row].to(dtype)                                            # [H, D]
            scores = torch.einsum("hd,nhd->hn", q, k[lo:pos + 1]) * scale
            probs = torch.softmax(scores, dim=-1)
            out[row] = torch.einsum("hn,nhd->hd", probs, v[lo:pos + 1])
    return out


# ---- cache -----------------------------------------------------------------------------------------

def ref_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """kv_cache[:, slot // bs, slot % bs] = key/value[token] for each token whose slot is not -1."""
    block_size = kv_cache.shape[2]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot == -1:
            continue
        kv_cache[0, slot // block_size, slot % block_size] = key[token]
        kv_cache[1, slot // block_size, slot % block_size] = value[token]


def ref_copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """In every layer, block dst = block src (K and V) for each (src, dst) pair."""
    for cache in kv_caches:
        for src, dst in block_mapping.tolist():
            cache[:, dst] = cache[:, src]


def ref_swap_blocks(src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor],
                    block_mapping: torch.Tensor) -> None:
    """dst_caches[l][:, dst] = src_caches[l][:, src] for every layer and pair, across devices."""
    for src_cache, dst_cache in zip(src_caches, dst_caches, strict=True):
        for src, dst in block_mapping.tolist():
            dst_cache[:, dst] = src_cache[:, src].to(dst_cache.device)


# ---- layers ----------------------------------------------------------------------------------------

def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, weight = x.to(dtype), weight.to(dtype)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


def ref_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * weight, residual + x): the op's new x and new residual."""
    new_residual = x.to(dtype) + residual.to(dtype)
    return ref_rms_norm(new_residual, weight, eps, dtype), new_residual


def cos_sin_cache(max_position: int, rot_dim: int, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, rot_dim]: cos of each position's angles in the first rot_dim/2 columns, sin after."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int,
            is_neox: bool) -> torch.Tensor:
    """x [num_tokens, heads * head_size]; cos, sin [num_tokens, rot_dim / 2]."""
    num_tokens, width = x.shape
    x = x.reshape(num_tokens, width // head_size, head_size)
    rot_dim = 2 * cos.shape[-1]
    rot, passthrough = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    if is_neox:  # pairs (i, i + rot_dim/2): the two halves
        x1, x2 = rot[..., :rot_dim // 2], rot[..., rot_dim // 2:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # GPT-J: pairs (2i, 2i + 1), interleaved
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, passthrough], dim=-1).reshape(num_tokens, width)


def ref_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated (query, key), [num_tokens, heads * head_size] each; rot_dim = cos_sin_cache width."""
    cos, sin = cos_sin_cache[positions].to(dtype).chunk(2, dim=-1)
    return (_rotate(query.to(dtype), cos, sin, head_size, is_neox),
            _rotate(key.to(dtype), cos, sin, head_size, is_neox))


def ref_silu_and_mul(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] with d = x.shape[-1] // 2."""
    x = x.to(dtype)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
