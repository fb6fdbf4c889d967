"""Per-step attention metadata: where each sequence's new tokens are, and where its K/V live.

Built once per step and shared by every layer. Layout and meaning are the kernels' (csrc/ops.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def cache_slot(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The KV-cache slot of the token at `position`: its block's id * block_size + its offset there."""
    return block_table[position // block_size] * block_size + position % block_size


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: new tokens of seq i are rows [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor         # int32 [num_seqs]: context + new tokens (0: a padded row)
    block_tables: torch.Tensor     # int32 [num_seqs, max_blocks]: physical block of each logical block
    slot_mapping: torch.Tensor     # int64 [num_tokens]: block * block_size + offset (-1: padding)
    max_query_len: int             # host-side: 1 selects the decode kernel
    workspace: Optional[torch.Tensor] = None  # split-KV scratch (_ops.paged_attention_workspace)

    @classmethod
    def build(cls, seq_lens: Sequence[int], query_lens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int, device: torch.device | str,
              workspace: Optional[torch.Tensor] = None) -> AttentionMetadata:
        """From host lists: sequence i brings query_lens[i] new tokens, the last of its seq_lens[i]
        tokens, whose K/V go to the slots its block table gives their positions."""
        if not len(seq_lens) == len(query_lens) == len(block_tables):
            raise ValueError(f"{len(seq_lens)} seq_lens, {len(query_lens)} query_lens and "
                             f"{len(block_tables)} block tables: one of each per sequence")
        query_start_loc, slots = [0], []
        for seq_len, query_len, table in zip(seq_lens, query_lens, block_tables):
            if not 0 < query_len <= seq_len <= len(table) * block_size:
                raise ValueError(f"need 0 < query_len ({query_len}) <= seq_len ({seq_len}) <= "
                                 f"{len(table)} blocks * {block_size}")
            query_start_loc.append(query_start_loc[-1] + query_len)
            slots += [cache_slot(table, p, block_size) for p in range(seq_len - query_len, seq_len)]
        max_blocks = max((len(t) for t in block_tables), default=0)
        # Unused tail entries are never read (the kernels stop at seq_len); 0 keeps them in range.
        padded_tables = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        tables = torch.tensor(padded_tables, dtype=torch.int32, device=device)
        return cls(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.reshape(len(block_tables), max_blocks),  # [0, 0] when the step is empty
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            workspace=workspace,
        )
