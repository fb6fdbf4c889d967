"""Rotary position embedding (RoPE), plain or with Llama 3.1's frequency scaling."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from pagedinfer import _ops
from pagedinfer.config import Llama3RopeScaling


def rope_inv_freq(rot_dim: int, theta: float, scaling: Optional[Llama3RopeScaling]) -> torch.Tensor:
    """The rot_dim / 2 angular frequencies, in float32."""
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    inv_freq = 1.0 / (theta ** exponents)
    return inv_freq if scaling is None else _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    """Llama 3.1 stretches the long wavelengths by `factor` (they were undertrained for long context),
    keeps the short ones, and blends linearly in wavelength-space between the two bands."""
    wavelen = 2 * math.pi / inv_freq
    context = s.original_max_position_embeddings
    long_band = wavelen > context / s.low_freq_factor
    short_band = wavelen < context / s.high_freq_factor
    # 0 at the long end of the middle band, 1 at its short end.
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(long_band, inv_freq / s.factor, torch.where(short_band, inv_freq, blended))


def build_cos_sin_cache(rot_dim: int, max_position: int, theta: float,
                        scaling: Optional[Llama3RopeScaling], dtype: torch.dtype) -> torch.Tensor:
    """[max_position, rot_dim]: cos of each position's angles in the first half, sin in the second.
    Angles are computed in float32 (as HF does) and only the result is rounded to `dtype`."""
    positions = torch.arange(max_position, dtype=torch.float32)
    angles = torch.outer(positions, rope_inv_freq(rot_dim, theta, scaling))
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype).contiguous()


class RotaryEmbedding(nn.Module):
    """Rotates query and key heads in place by their tokens' positions."""

    def __init__(self, head_size: int, rot_dim: int, max_position: int, theta: float,
                 scaling: Optional[Llama3RopeScaling] = None, is_neox: bool = True) -> None:
        super().__init__()
        self.head_size = head_size
        self.is_neox = is_neox
        # In the model's dtype (the kernel takes it in query's), like every parameter built under the
        # loader's default dtype. Not persistent: derived from the config, never in a checkpoint.
        cache = build_cos_sin_cache(rot_dim, max_position, theta, scaling, torch.get_default_dtype())
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        """query [num_tokens, num_heads * head_size], key [num_tokens, num_kv_heads * head_size]
        (views of a fused qkv are fine), positions [num_tokens] int64."""
        _ops.rotary_embedding(positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox)
