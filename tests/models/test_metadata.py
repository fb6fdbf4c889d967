"""AttentionMetadata.build: slots follow the block tables, and bad lengths are refused."""

from __future__ import annotations

import pytest
import torch

from pagedinfer.attention import AttentionMetadata


def test_build_from_lists() -> None:
    # Sequence 0: 6 cached + 3 new tokens (positions 6..8) in blocks [7, 2, 5] of 4 slots.
    # Sequence 1: a 2-token prompt in block [3].
    m = AttentionMetadata.build(seq_lens=[9, 2], query_lens=[3, 2], block_tables=[[7, 2, 5], [3]],
                                block_size=4, device="cpu")
    assert m.query_start_loc.tolist() == [0, 3, 5] and m.query_start_loc.dtype == torch.int32
    assert m.seq_lens.tolist() == [9, 2] and m.seq_lens.dtype == torch.int32
    assert m.block_tables.tolist() == [[7, 2, 5], [3, 0, 0]] and m.block_tables.dtype == torch.int32
    assert m.slot_mapping.tolist() == [2 * 4 + 2, 2 * 4 + 3, 5 * 4 + 0, 3 * 4 + 0, 3 * 4 + 1]
    assert m.slot_mapping.dtype == torch.int64
    assert m.max_query_len == 3 and m.workspace is None


@pytest.mark.parametrize("seq_lens, query_lens, tables", [
    ([4], [5], [[0]]),     # more new tokens than the sequence has
    ([5], [1], [[0]]),     # the sequence outgrows its one block of 4
    ([3], [0], [[0]]),     # a sequence with nothing to compute
    ([3, 1], [1], [[0]]),  # lists of different lengths
])
def test_build_refuses_inconsistent_lengths(seq_lens, query_lens, tables) -> None:
    with pytest.raises(ValueError):
        AttentionMetadata.build(seq_lens, query_lens, tables, block_size=4, device="cpu")
