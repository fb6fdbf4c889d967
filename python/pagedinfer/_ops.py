"""The only module that touches ``torch.ops.pagedinfer``: typed wrappers over the ops of ``pagedinfer._C``.

Contracts (shapes, dtypes, what each op writes) are documented in ``csrc/ops.h``. The ops run our own
kernels on CPU and CUDA tensors alike; nothing here falls back to a Python implementation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pagedinfer import _C  # noqa: F401  (importing it registers torch.ops.pagedinfer)

_ops = torch.ops.pagedinfer

# Every op mutates its outputs and returns nothing: the fake (meta) kernels only have to exist, so that
# torch.compile and opcheck can trace them.
for _name in ("paged_attention", "reshape_and_cache", "copy_blocks", "swap_blocks", "rms_norm",
              "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "philox_uniform"):
    torch.library.register_fake(f"pagedinfer::{_name}")(lambda *args, **kwargs: None)


def has_cuda_kernels() -> bool:
    """Whether this build compiled the CUDA kernels (a CPU-only torch gives a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pagedinfer::paged_attention", "CUDA")


def set_debug_checks(enabled: bool) -> None:
    """Range-check block ids, slots and lengths on CUDA too (copies metadata to the host: slow)."""
    _ops.set_debug_checks(enabled)


def debug_checks_enabled() -> bool:
    return _ops.debug_checks_enabled()


def prefill_launch_counts() -> tuple[int, int]:
    """Prompt-kernel launches so far that loaded Q by TMA (else by cp.async), and that ran half-width
    diagonal tiles (same results either way)."""
    q_by_tma, half_tiles = _ops.prefill_launch_counts()
    return q_by_tma, half_tiles


# ---- attention -------------------------------------------------------------------------------------

def paged_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    max_query_len: int, scale: float, sliding_window: int = -1,
                    workspace: Optional[torch.Tensor] = None) -> None:
    """out[num_tokens, num_heads, head_size] = causal attention of query over the paged context."""
    _ops.paged_attention(out, query, kv_cache, query_start_loc, seq_lens, block_tables,
                         max_query_len, scale, sliding_window, workspace)


def paged_attention_workspace(num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int,
                              max_blocks_per_seq: int, block_size: int,
                              device: torch.device | str) -> Optional[torch.Tensor]:
    """The scratch buffer of launches up to this size (split-KV partials, a decode order), allocated once
    (None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _ops.paged_attention_workspace_size(num_seqs, num_heads, num_kv_heads, head_size,
                                            max_blocks_per_seq, block_size, index)
    return torch.empty(max(n, 1), dtype=torch.float32, device=device)


# ---- cache -----------------------------------------------------------------------------------------

def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    _ops.reshape_and_cache(key, value, kv_cache, slot_mapping)


def copy_blocks(kv_caches: Sequence[torch.Tensor], block_mapping: torch.Tensor) -> None:
    _ops.copy_blocks(list(kv_caches), block_mapping)


def swap_blocks(src_caches: Sequence[torch.Tensor], dst_caches: Sequence[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    _ops.swap_blocks(list(src_caches), list(dst_caches), block_mapping)


# ---- layers ----------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    _ops.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """residual += x; x = rms_norm(residual) * weight, both in place."""
    _ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    _ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    d = x.shape[-1] // 2
    out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device) if out is None else out
    _ops.silu_and_mul(out, x)
    return out


# ---- sampling --------------------------------------------------------------------------------------

def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor, num_columns: int,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[num_rows, num_columns] float32 uniforms in (0, 1), row i a pure function of (seeds[i], offsets[i]):
    the same bits on CPU and CUDA and whatever the other rows. seeds, offsets: [num_rows] int64."""
    if out is None:
        out = torch.empty(seeds.shape[0], num_columns, dtype=torch.float32, device=seeds.device)
    _ops.philox_uniform(out, seeds, offsets)
    return out
