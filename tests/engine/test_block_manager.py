"""BlockManager: allocation, reference counts, prefix caching with chain hashes, LRU eviction, fork."""

import pytest

from pagedinfer.engine.block_manager import BlockManager
from pagedinfer.engine.sequence import Sequence, SequenceGroup
from pagedinfer.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_seq(token_ids: list[int]) -> Sequence:
    return SequenceGroup("request", token_ids, SamplingParams()).seqs[0]


def run_prompt(manager: BlockManager, token_ids: list[int]) -> Sequence:
    """Allocate a whole prompt in one step and mark it computed, as the scheduler would."""
    seq = make_seq(token_ids)
    seq.num_computed_tokens = manager.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    return seq


def decode(manager: BlockManager, seq: Sequence, token_id: int) -> list[tuple[int, int]]:
    """Compute the last token's KV and append a sampled one, as one decode step would."""
    copies = manager.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    seq.append_token(token_id)
    return copies


def test_allocate_and_free_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = run_prompt(manager, list(range(10)))
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert manager.num_free_blocks == 5
    assert all(manager.ref_count(block) == 1 for block in seq.block_table)
    manager.free(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 8


def test_append_slots_grows_by_blocks():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = run_prompt(manager, list(range(4)))
    assert len(seq.block_table) == 1
    decode(manager, seq, 100)  # computes token 3's KV: still one block
    assert len(seq.block_table) == 1
    decode(manager, seq, 101)  # position 4 opens the second block
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 6


def test_prefix_hit_reuses_leading_full_blocks_and_counts_them():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = run_prompt(manager, list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    second = make_seq(list(range(9)) + [50, 51])
    assert manager.cached_prefix_length(second) == 8
    assert manager.allocate(second, second.num_tokens) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [manager.ref_count(b) for b in first.block_table] == [2, 2, 1]
    stats = manager.stats
    assert (stats.queried_blocks, stats.hit_blocks) == (2 + 2, 2)
    assert (stats.queried_tokens, stats.hit_tokens) == (10 + 11, 8)


def test_freed_blocks_stay_cached_until_evicted():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    manager.free(run_prompt(manager, list(range(9))))
    assert manager.num_free_blocks == 4
    again = make_seq(list(range(9)))
    assert manager.allocate(again, 9) == 8
    assert manager.num_free_blocks == 1


def test_never_hits_the_whole_prompt():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    run_prompt(manager, list(range(8)))
    # All 8 tokens are cached, but the last one must be computed for its logits: only one block hits.
    assert manager.cached_prefix_length(make_seq(list(range(8)))) == 4
    assert manager.cached_prefix_length(make_seq(list(range(9)))) == 8


def test_chain_hash_depends_on_the_whole_prefix():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    run_prompt(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Block [5..8] is cached, but only after [1..4]: behind another first block it must not hit.
    assert manager.cached_prefix_length(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert manager.cached_prefix_length(make_seq([1, 2, 3, 4, 5, 6, 7, 9, 9])) == 4


def test_decoded_blocks_are_registered_when_full():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = run_prompt(manager, [1, 2, 3])
    for token_id in (4, 5, 6):
        decode(manager, seq, token_id)
    assert seq.token_ids == [1, 2, 3, 4, 5, 6] and seq.num_computed_tokens == 5
    assert manager.cached_prefix_length(make_seq([1, 2, 3, 4, 5, 6])) == 4


def test_lru_evicts_the_least_recently_freed_cached_block_first():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompts = [[10 * i + j for j in range(5)] for i in range(2)]  # one full block + one partial each
    seqs = [run_prompt(manager, prompt) for prompt in prompts]
    manager.free(seqs[0])  # freed first: its full block is the least recently used
    manager.free(seqs[1])
    # The partial blocks hold nothing cached: they go first; the third fresh block evicts prompt 0's.
    run_prompt(manager, [90, 91, 92, 93, 94, 95, 96, 97, 98])
    assert manager.cached_prefix_length(make_seq(prompts[0])) == 0
    assert manager.cached_prefix_length(make_seq(prompts[1])) == 4


def test_a_freed_sequence_loses_its_tail_before_its_prefix():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    manager.free(run_prompt(manager, list(range(9))))  # two cached full blocks + one partial
    run_prompt(manager, [50, 51, 52, 53, 54])  # takes the partial block, then evicts one cached block
    assert manager.cached_prefix_length(make_seq(list(range(9)))) == 4


def test_uncached_free_blocks_are_used_before_evicting():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    manager.free(run_prompt(manager, list(range(5))))
    run_prompt(manager, [70, 71, 72, 73, 74, 75])  # two fresh blocks: there are three uncached free
    assert manager.cached_prefix_length(make_seq(list(range(5)))) == 4


def test_reusing_a_free_cached_block_costs_a_free_block():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    manager.free(run_prompt(manager, list(range(9))))  # blocks [0..3], [4..7] cached, all 3 free
    seq = make_seq(list(range(8)) + [40, 41, 42, 43, 44])
    # 2 cached blocks + 2 fresh ones = 4 > 3, though 3 are free and 2 of them are hits.
    assert manager.cached_prefix_length(seq) == 8
    assert not manager.can_allocate(seq, 13)
    assert manager.can_allocate(seq, 12)
    assert manager.allocate(seq, 12) == 8 and manager.num_free_blocks == 0


def test_can_append_slots_and_append_slots_refuse_when_full():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = run_prompt(manager, list(range(8)))
    seq.append_token(8)
    assert not manager.can_append_slots(seq, 1)
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        manager.append_slots(seq, 1)
    assert len(seq.block_table) == 2


def test_fork_shares_every_block_and_copies_exactly_the_partial_one():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = run_prompt(manager, list(range(10)))
    child = parent.group.fork(parent)
    manager.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(manager.ref_count(block) == 2 for block in parent.block_table)
    assert manager.num_free_blocks == 5
    partial = parent.block_table[2]

    parent.append_token(100)
    child.append_token(200)
    copies = decode(manager, parent, 101)  # parent writes position 10 into the shared partial block
    new_block = parent.block_table[2]
    assert copies == [(partial, new_block)] and new_block != partial
    assert decode(manager, child, 201) == []  # the child now holds it alone: writes in place
    assert child.block_table == parent.block_table[:2] + [partial]
    assert [manager.ref_count(b) for b in child.block_table] == [2, 2, 1]
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_fork_with_full_last_block_copies_nothing():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = run_prompt(manager, list(range(8)))
    child = parent.group.fork(parent)
    manager.fork(parent, child)
    parent.append_token(1)
    child.append_token(2)
    assert decode(manager, parent, 3) == [] and decode(manager, child, 4) == []
    assert parent.block_table[:2] == child.block_table[:2] and parent.block_table[2] != child.block_table[2]


def test_prefix_caching_off():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    manager.free(run_prompt(manager, list(range(9))))
    again = make_seq(list(range(9)))
    assert manager.cached_prefix_length(again) == 0 and manager.allocate(again, 9) == 0
    assert again.block_hashes == [] and manager.stats.queried_tokens == 0


def test_prompt_logprobs_bypass_the_prefix_cache():
    # They need the logits of every prompt token, so none of its KV may come from the cache.
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.free(run_prompt(manager, list(range(9))))
    wants_logprobs = SequenceGroup("r", list(range(9)), SamplingParams(prompt_logprobs=1)).seqs[0]
    assert manager.cached_prefix_length(wants_logprobs) == 0 and manager.allocate(wants_logprobs, 9) == 0
    assert manager.cached_prefix_length(make_seq(list(range(9)))) == 8


def test_a_block_is_reusable_in_the_step_that_computes_it():
    # Hashes are registered at allocation: a prompt admitted in the same step shares the block (safe
    # because every layer writes the step's KV before attention reads the cache).
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq(list(range(5)))
    b = make_seq(list(range(5)))
    manager.allocate(a, 5)
    assert manager.allocate(b, 5) == 4 and b.block_table[0] == a.block_table[0]
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8


def test_duplicate_content_leaves_the_second_block_uncached():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq(list(range(5)))
    b = make_seq(list(range(5)))
    manager.allocate(a, 3)  # a's first block is not full yet
    a.num_computed_tokens = 3
    assert manager.allocate(b, 5) == 0
    b_block = b.block_table[0]
    manager.append_slots(a, 2)  # a fills a block with b's content: b's stays the cached one
    manager.free(b)
    manager.free(a)
    assert manager.num_free_blocks == 8
    again = make_seq(list(range(5)))
    assert manager.allocate(again, 5) == 4 and again.block_table[0] == b_block


def test_swap_out_and_in_move_every_block_between_the_pools():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, num_cpu_blocks=4)
    seq = run_prompt(manager, list(range(10)))
    device_blocks = list(seq.block_table)
    assert manager.can_swap_out(seq)
    swapped_out = manager.swap_out(seq)
    assert [device for device, _ in swapped_out] == device_blocks
    assert len({cpu for _, cpu in swapped_out}) == 3
    assert seq.block_table == [] and manager.num_free_blocks == 8 and manager.num_free_cpu_blocks == 1
    assert manager.can_swap_in(seq, 1) and not manager.can_swap_in(seq, 100)
    swapped_in = manager.swap_in(seq)
    # Each block comes back to the device block the table now names, in order.
    assert swapped_in == [(cpu, device) for (_, cpu), device in zip(swapped_out, seq.block_table)]
    assert manager.num_free_blocks == 5 and manager.num_free_cpu_blocks == 4
    manager.free(seq)
    assert manager.num_free_blocks == 8


def test_swap_out_refuses_shared_blocks_and_a_full_cpu_pool():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, num_cpu_blocks=2)
    shared = run_prompt(manager, list(range(6)))
    hit = run_prompt(manager, list(range(6)))  # a prefix-cache hit shares the first block
    assert hit.block_table[0] == shared.block_table[0]
    assert not manager.can_swap_out(shared) and not manager.can_swap_out(hit)
    with pytest.raises(RuntimeError, match="swapped out"):
        manager.swap_out(shared)
    manager.free(hit)
    assert manager.can_swap_out(shared)
    longer = run_prompt(manager, list(range(100, 112)))
    assert not manager.can_swap_out(longer)  # 3 blocks, 2 CPU blocks


def test_a_swapped_out_block_stays_cached_and_freeing_returns_the_cpu_blocks():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, num_cpu_blocks=4)
    seq = run_prompt(manager, list(range(10)))
    first_block = seq.block_table[0]
    manager.swap_out(seq)
    # Released like free() does: intact until evicted, so a new prompt may hit it.
    assert manager.cached_prefix_length(make_seq(list(range(9)))) == 8
    assert manager.allocate(make_seq(list(range(5))), 5) == 4
    assert manager.ref_count(first_block) == 1
    manager.free(seq)  # aborted while swapped out
    assert manager.num_free_cpu_blocks == 4
