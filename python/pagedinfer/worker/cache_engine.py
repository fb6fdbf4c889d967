"""The paged KV cache: how many blocks fit, and the per-layer tensors that hold them."""

from __future__ import annotations

import torch

from pagedinfer import _ops
from pagedinfer.config import CacheConfig, ModelConfig, SchedulerConfig

_GIB = 1 << 30


def kv_block_bytes(model: ModelConfig, block_size: int) -> int:
    """Bytes of one block across all layers: K and V of block_size tokens."""
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * block_size * model.num_key_value_heads * model.head_dim * itemsize * model.num_hidden_layers


def num_kv_blocks(model: ModelConfig, cache: CacheConfig) -> int:
    """The pool size where it is not profiled: `cache.num_gpu_blocks` when set, else (on the CPU)
    `cpu_kv_cache_space_gib` of blocks. On CUDA without an override, memory_profiler sizes it."""
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks
    return int(cache.cpu_kv_cache_space_gib * _GIB) // kv_block_bytes(model, cache.block_size)


def num_swap_blocks(model: ModelConfig, cache: CacheConfig, scheduler: SchedulerConfig) -> int:
    """The CPU swap pool's size: `cache.swap_space_gib` of blocks, none unless preemption swaps."""
    if scheduler.preemption_mode != "swap":
        return 0
    return int(cache.swap_space_gib * _GIB) // kv_block_bytes(model, cache.block_size)


class CacheEngine:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer, in the model dtype, and
    a CPU swap pool of the same layout with `num_cpu_blocks` blocks (pinned when the cache is on CUDA,
    as swap_blocks needs)."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.device = device
        # Never read before written (attention stops at each sequence's length): no need to zero it.
        self.kv_caches = [
            torch.empty(2, num_blocks, block_size, model.num_key_value_heads, model.head_dim,
                        dtype=model.dtype, device=device)
            for _ in range(model.num_hidden_layers)]
        self.cpu_caches = [
            torch.empty(2, num_cpu_blocks, block_size, model.num_key_value_heads, model.head_dim,
                        dtype=model.dtype, pin_memory=device.type == "cuda")
            for _ in range(model.num_hidden_layers)] if num_cpu_blocks else []

    def swap_out(self, blocks_to_swap_out: list[tuple[int, int]]) -> None:
        """CPU block dst = device block src in every layer."""
        if blocks_to_swap_out:
            _ops.swap_blocks(self.kv_caches, self.cpu_caches,
                             torch.tensor(blocks_to_swap_out, dtype=torch.int64))

    def swap_in(self, blocks_to_swap_in: list[tuple[int, int]]) -> None:
        """Device block dst = CPU block src in every layer."""
        if blocks_to_swap_in:
            _ops.swap_blocks(self.cpu_caches, self.kv_caches,
                             torch.tensor(blocks_to_swap_in, dtype=torch.int64))

    def copy(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        """Copy-on-write of forked sequences: block dst = block src in every layer, in one launch."""
        if blocks_to_copy:
            _ops.copy_blocks(self.kv_caches, torch.tensor(blocks_to_copy, dtype=torch.int64))
