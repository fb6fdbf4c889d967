"""Input builders and the comparison rule shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import pytest
import torch

# context_len of a padded row (seq_len 0): its q_len rows of output must be zeros.
PAD = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def per_device(cpu: Iterable, cuda: Iterable) -> list:
    """(device, value) parameters where the sizes worth testing differ by device: each CPU value, and
    each CUDA value marked `gpu`. Values that are tuples are spread into the parameter."""
    def spread(v):
        return v if isinstance(v, tuple) else (v,)
    return ([pytest.param("cpu", *spread(v)) for v in cpu]
            + [pytest.param("cuda", *spread(v), marks=pytest.mark.gpu) for v in cuda])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def randn(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal data drawn on the CPU generator (seeded per test), then moved."""
    return torch.randn(*shape, dtype=torch.float32).to(dtype=dtype, device=device)


def row_strided(num_rows: int, shape: Sequence[int], dtype: torch.dtype,
                device: torch.device | str, extra_cols: int = 24) -> torch.Tensor:
    """Random [num_rows, *shape] whose rows are spaced wider than their size: a view of a larger
    qkv-like buffer, as the engine hands in query/key/value (last dims stay contiguous)."""
    row = 1
    for n in shape:
        row *= n
    buffer = randn(num_rows, row + extra_cols, dtype=dtype, device=device)
    return buffer[:, extra_cols // 2:extra_cols // 2 + row].view(num_rows, *shape)


@dataclass
class PagedInputs:
    query: torch.Tensor            # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor         # [2, num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor         # [num_seqs] int32
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor     # [num_tokens] int64, -1 for the rows of padded sequences
    max_query_len: int

    @property
    def metadata(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query_start_loc, self.seq_lens, self.block_tables


def make_paged_inputs(seq_specs: Sequence[tuple[Optional[int], int]], num_heads: int, num_kv_heads: int,
                      head_size: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", *, free_blocks: int = 3,
                      max_blocks_per_seq: Optional[int] = None,
                      strided_query: bool = False) -> PagedInputs:
    """One step's attention inputs from (context_len, q_len) per sequence (context_len PAD: a padded row).

    Like a running engine: every sequence owns distinct blocks drawn from a random permutation of the
    pool, and table columns past a sequence's last block (and whole rows of padded sequences) hold
    stale ids of other blocks, which a kernel must never follow. The cache is random everywhere.
    """
    q_lens = [q_len for _, q_len in seq_specs]
    seq_lens = [0 if ctx is PAD else ctx + q_len for ctx, q_len in seq_specs]
    blocks_needed = [cdiv(n, block_size) for n in seq_lens]
    if max_blocks_per_seq is None:
        max_blocks_per_seq = max(blocks_needed, default=0) + 1  # one stale column
    assert max(blocks_needed, default=0) <= max_blocks_per_seq
    num_blocks = sum(blocks_needed) + free_blocks
    num_seqs, num_tokens = len(seq_specs), sum(q_lens)

    pool = torch.randperm(num_blocks)
    block_tables = torch.randint(0, num_blocks, (num_seqs, max_blocks_per_seq), dtype=torch.int32)
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64)
    taken = 0
    token = 0
    for i, (n_blocks, seq_len, q_len) in enumerate(zip(blocks_needed, seq_lens, q_lens)):
        block_tables[i, :n_blocks] = pool[taken:taken + n_blocks]
        taken += n_blocks
        if seq_len > 0:  # the new tokens are the last q_len positions
            positions = torch.arange(seq_len - q_len, seq_len)
            slot_mapping[token:token + q_len] = (block_tables[i, positions // block_size].long() * block_size
                                                 + positions % block_size)
        token += q_len

    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if strided_query:
        query = row_strided(num_tokens, (num_heads, head_size), dtype, device)
    else:
        query = randn(num_tokens, num_heads, head_size, dtype=dtype, device=device)
    return PagedInputs(
        query=query,
        kv_cache=randn(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype, device=device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=max(q_lens, default=0),
    )


def random_seq_specs(num_seqs: int, max_context: int, max_q_len: int,
                     decode_fraction: float = 0.5) -> list[tuple[int, int]]:
    """A ragged mix of decodes (q_len 1) and prefill chunks (q_len in [1, max_q_len]) over contexts
    of random length in [0, max_context] (prefills from scratch included)."""
    specs = []
    for _ in range(num_seqs):
        ctx = int(torch.randint(0, max_context + 1, ()))
        if float(torch.rand(())) < decode_fraction:
            specs.append((ctx, 1))
        else:
            specs.append((ctx, int(torch.randint(1, max_q_len + 1, ()))))
    return specs


def distinct_blocks(num_blocks: int, count: int) -> list[int]:
    """`count` distinct block ids in random order."""
    return torch.randperm(num_blocks)[:count].tolist()


# ---- comparison ------------------------------------------------------------------------------------

def _slack(dtype: torch.dtype, magnitude: float) -> float:
    """Absolute slack on top of the derived bound. float32: 1e-5 (summing thousands of terms in another
    order than torch does costs ~1e-6). Otherwise one eps at the output's own scale (an ulp or two),
    so that an output the low-precision reference happens to get exactly right still allows the final
    rounding; relative, not floored at 1, because long-context outputs are small (~0.02) and a floor
    would hide a dropped split."""
    if dtype == torch.float32:
        return 1e-5 * max(1.0, magnitude)
    return torch.finfo(dtype).eps * magnitude


def assert_close_to_ref(ours: torch.Tensor, reference: Callable[[torch.dtype], torch.Tensor],
                        dtype: torch.dtype, name: str = "output") -> None:
    """max|ours - ref_hi| <= 2 * max|ref_lowp - ref_hi| + slack.

    ref_hi is the reference in float64 from the same (low-precision) inputs; ref_lowp is the same
    reference computed in `dtype`: how far an honest computation in that precision lands. A kernel
    may be up to twice as far; a wrong block, mask or scale is orders of magnitude further.
    """
    ref_hi = reference(torch.float64)
    assert ours.shape == ref_hi.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_hi.shape)}"
    if ours.numel() == 0:
        return
    ref_lowp = reference(dtype)
    magnitude = ref_hi.abs().max().item()
    budget = (ref_lowp.double() - ref_hi).abs().max().item()
    tol = 2 * budget + _slack(dtype, magnitude)
    # The bound must stay meaningful: if the low-precision reference itself were this far off,
    # the test could no longer tell a correct kernel from a broken one.
    assert 2 * budget <= 0.05 * magnitude, f"{name}: derived bound {tol:.3g} is vacuous"
    err = (ours.double() - ref_hi).abs()
    max_err = err.max().item()  # NaN propagates, and NaN <= tol is False
    if not max_err <= tol:
        where = tuple(int(i) for i in torch.nonzero(~(err <= tol))[0].tolist())
        raise AssertionError(
            f"{name} ({dtype}): max |ours - ref64| = {max_err:.4g} > bound {tol:.4g} "
            f"(2 x {dtype} reference error {budget:.4g} + slack); first bad index {where}: "
            f"ours {ours[where].item():.6g}, ref {ref_hi[where].item():.6g}")
