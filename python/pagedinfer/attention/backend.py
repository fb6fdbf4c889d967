"""The attention layer: caches the step's K/V, then attends over each sequence's paged context."""

from __future__ import annotations

import torch
from torch import nn

from pagedinfer import _ops
from pagedinfer.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int, scale: float,
                 sliding_window: int = -1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """query [num_tokens, num_heads * head_size], key and value [num_tokens, num_kv_heads *
        head_size] (views of a fused qkv: the kernels take free row strides), kv_cache [2, num_blocks,
        block_size, num_kv_heads, head_size] -> [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(num_tokens, self.num_kv_heads, self.head_size)
        value = value.view(num_tokens, self.num_kv_heads, self.head_size)
        # The new tokens attend to themselves too: their K/V must be in the cache first.
        _ops.reshape_and_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        _ops.paged_attention(out, query, kv_cache, metadata.query_start_loc, metadata.seq_lens,
                             metadata.block_tables, metadata.max_query_len, self.scale,
                             self.sliding_window, metadata.workspace)
        return out.view(num_tokens, self.num_heads * self.head_size)
