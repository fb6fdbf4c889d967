"""The KV-cache block pool: block ids, reference counts, and prefix caching by content hash.

A sequence's block table covers its computed tokens (between steps: exactly ceil(num_computed_tokens /
block_size) blocks). A full block is registered under a chain hash of its tokens, so a later prompt
with the same leading tokens reuses it instead of recomputing it. A block whose last reference goes
stays cached, and is evicted (least recently freed first) only when a fresh block is needed.

Swap preemption moves a sequence's blocks to a second, smaller pool of `num_cpu_blocks` ids (the CPU
swap space) and back. Only a sequence holding every block alone is swapped (`can_swap_out`): a block
shared by fork or by a prefix-cache hit would otherwise need one copy for several owners, so such a
sequence is preempted by recompute instead. Its device blocks are released as `free` releases them: a
registered full block stays cached (its content is intact until evicted); blocks swapped back in are
fresh and unregistered.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from pagedinfer.engine.sequence import Sequence


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Chain hash: a full block's hash names its tokens and, through its parent, every token before."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups, counted when a sequence gets its blocks (not when a check says no)."""

    queried_blocks: int = 0
    hit_blocks: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Owns the ids of `num_blocks` blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_cpu_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        # Free blocks holding nothing reusable: handed out first.
        self._free: deque[int] = deque(range(num_blocks))
        # Free blocks still cached, least recently freed first: evicted in this order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_cpu_blocks = num_cpu_blocks
        # A swapped block has one owner (see can_swap_out): a free list is all the CPU pool needs.
        self._free_cpu: deque[int] = deque(range(num_cpu_blocks))
        # Swapped-out sequences' blocks in the CPU pool, by seq_id, in block-table order.
        self._cpu_block_tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks without a reference, cached ones included (they are reusable or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self._free_cpu)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def cached_prefix_length(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose KV is cached: whole blocks, never all its tokens."""
        return len(self._cached_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would find enough blocks."""
        cached = self._cached_prefix(seq)
        # A cached block nobody holds is counted as free: taking it leaves one fewer for fresh blocks.
        num_cached_free = sum(1 for block in cached if self._ref_counts[block] == 0)
        num_fresh = self._num_blocks_for(num_tokens) - len(cached)
        return num_fresh <= self.num_free_blocks - num_cached_free

    def allocate(self, seq: Sequence, num_tokens: int) -> int:
        """Give a sequence without blocks its cached prefix, plus fresh blocks up to `num_tokens`
        tokens (cached ones included). Returns the number of cached tokens."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already has blocks")
        if not self.can_allocate(seq, num_tokens):
            raise RuntimeError(f"not enough free blocks for {num_tokens} tokens of sequence {seq.seq_id}")
        cached = self._cached_prefix(seq)
        num_cached_tokens = len(cached) * self.block_size
        if num_tokens < num_cached_tokens:
            raise ValueError(f"num_tokens={num_tokens} is less than the {num_cached_tokens} cached tokens")
        for block in cached:  # before any fresh block: an eviction must not take a block we reuse
            self._take(block)
        seq.block_table = list(cached)
        self._grow(seq, num_cached_tokens, num_tokens)
        if self.enable_prefix_caching:
            self.stats.queried_blocks += (seq.num_tokens - 1) // self.block_size
            self.stats.hit_blocks += len(cached)
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += num_cached_tokens
        return num_cached_tokens

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        num_needed = (self._num_blocks_for(seq.num_computed_tokens + num_new_tokens)
                      - len(seq.block_table) + self._next_block_is_shared(seq))
        return num_needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Grow the block table to cover `num_new_tokens` more tokens. Returns (src, dst) block copies
        to run (copy_blocks) before the step's forward: a forked sequence about to write into a partly
        filled block it shares gets its own copy first (copy-on-write)."""
        if not self.can_append_slots(seq, num_new_tokens):
            raise RuntimeError(f"not enough free blocks for {num_new_tokens} new tokens of "
                               f"sequence {seq.seq_id}")
        copies = []
        if self._next_block_is_shared(seq):
            index = seq.num_computed_tokens // self.block_size
            shared, own = seq.block_table[index], self._take_fresh()
            self._release(shared)
            seq.block_table[index] = own
            copies.append((shared, own))
        self._grow(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens)
        return copies

    def can_swap_out(self, seq: Sequence) -> bool:
        """Whether `seq` holds all its blocks alone and the CPU pool has room for them."""
        return (all(self._ref_counts[block] == 1 for block in seq.block_table)
                and len(seq.block_table) <= len(self._free_cpu))

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move `seq`'s blocks to the CPU pool. Returns the (device, cpu) block copies to run (swap_blocks)
        before the step's forward, which may reuse the released device blocks."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"sequence {seq.seq_id} cannot be swapped out")
        cpu_blocks = [self._free_cpu.popleft() for _ in seq.block_table]
        mapping = list(zip(seq.block_table, cpu_blocks))
        self.free(seq)
        self._cpu_block_tables[seq.seq_id] = cpu_blocks
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Whether the device pool has room for `seq`'s swapped blocks and `num_new_tokens` more tokens."""
        return self._num_blocks_for(seq.num_computed_tokens + num_new_tokens) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring `seq`'s blocks back into fresh device blocks. Returns the (cpu, device) block copies to
        run (swap_blocks) before the step's forward."""
        if not self.can_swap_in(seq):
            raise RuntimeError(f"not enough free blocks to swap in sequence {seq.seq_id}")
        cpu_blocks = self._cpu_block_tables.pop(seq.seq_id)
        seq.block_table = [self._take_fresh() for _ in cpu_blocks]
        self._free_cpu.extend(cpu_blocks)
        return list(zip(cpu_blocks, seq.block_table))

    def free(self, seq: Sequence) -> None:
        # A swapped-out sequence (aborted or stopped) gives its CPU blocks back.
        self._free_cpu.extend(self._cpu_block_tables.pop(seq.seq_id, []))
        # The tail first: it becomes the least recently freed, so the prefix, the part other prompts
        # are likeliest to share, is evicted last.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all the parent's blocks; a shared partly filled block is copied when one of
        them first writes into it (append_slots)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._ref_counts[block] += 1

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _next_block_is_shared(self, seq: Sequence) -> bool:
        """Whether the next token lands in a partly filled block another sequence also holds."""
        if seq.num_computed_tokens % self.block_size == 0:
            return False
        return self._ref_counts[seq.block_table[seq.num_computed_tokens // self.block_size]] > 1

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        # prompt_logprobs need the logits of every prompt token, so none of them may be skipped.
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        blocks = []
        # The last token is always computed: sampling needs its logits.
        for index in range((seq.num_tokens - 1) // self.block_size):
            block = self._block_of_hash.get(self._block_hash(seq, index))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _block_hash(self, seq: Sequence, index: int) -> bytes:
        while len(seq.block_hashes) <= index:
            start = len(seq.block_hashes) * self.block_size
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids[start:start + self.block_size]))
        return seq.block_hashes[index]

    def _grow(self, seq: Sequence, num_computed_tokens: int, num_tokens: int) -> None:
        """Cover `num_tokens` tokens and register the blocks they fill. Registering before the forward
        writes the KV is safe: every layer writes the step's KV before its attention reads the cache."""
        while len(seq.block_table) < self._num_blocks_for(num_tokens):
            seq.block_table.append(self._take_fresh())
        if not self.enable_prefix_caching:
            return
        for index in range(num_computed_tokens // self.block_size, num_tokens // self.block_size):
            block, block_hash = seq.block_table[index], self._block_hash(seq, index)
            # A block computed twice (two prompts in one step) stays uncached: the first one is kept.
            if self._hash_of_block[block] is None and block_hash not in self._block_of_hash:
                self._hash_of_block[block] = block_hash
                self._block_of_hash[block_hash] = block

    def _take(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._evictable[block]
        self._ref_counts[block] += 1

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of_hash[self._hash_of_block[block]]
            self._hash_of_block[block] = None
        self._ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            if self._hash_of_block[block] is None:
                self._free.append(block)
            else:
                self._evictable[block] = None
