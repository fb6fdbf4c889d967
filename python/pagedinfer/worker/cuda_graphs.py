"""CUDA graphs of decode steps: the model forward captured once per batch size, replayed for every step
whose sequences each bring one new token.

A decode step of a small batch is launch-bound: each layer is a handful of short kernels, and the host
takes longer to launch them than the GPU to run them. A graph launches them all at once. The graphs read
persistent input buffers, so a step copies its data into their first rows and pads the rest of the
captured batch harmlessly: token 0 at position 0, slot -1 (reshape_and_cache skips it), seq_len 0
(paged_attention writes zeros and reads nothing). Attention is graph-safe by contract (csrc/ops.h): its
split count is planned from shapes only and its workspace, sized for the largest batch, serves all.

The graphs produce hidden states, not logits: the LM head then runs on the sampled rows only (a graph
output of [batch, vocab] float32 would hold the pool's largest tensor for padded rows), and the
sampler, whose work depends on each step's parameters, stays outside.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import logging
import time
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from pagedinfer import _ops
from pagedinfer.attention import AttentionMetadata
from pagedinfer.attention.metadata import cache_slot

logger = logging.getLogger(__name__)

# Batch sizes 1, 2, 4 and 8 (small batches are the launch-bound ones), then every multiple of this.
_SIZE_STEP = 8
# Larger decode batches run eagerly: their kernels are long enough to hide the launches, and capturing
# every multiple of 8 beyond would only add capture time (vLLM stops at 512 too).
MAX_CAPTURE_SIZE = 512


def capture_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture, ascending: 1, 2, 4, 8, then every multiple of 8 up to max_num_seqs,
    and max_num_seqs itself, so that every decode batch the scheduler can form has a graph (up to
    MAX_CAPTURE_SIZE)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    largest = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = {s for s in (1, 2, 4) if s <= largest}
    sizes.update(range(_SIZE_STEP, largest + 1, _SIZE_STEP))
    sizes.add(largest)
    return sorted(sizes)


def padded_batch_size(num_seqs: int, sizes: Sequence[int]) -> Optional[int]:
    """The smallest of the ascending `sizes` that holds num_seqs rows; None if none does (or num_seqs
    is 0)."""
    if num_seqs <= 0:
        return None
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) else None


def decode_slot(seq_len: int, block_table: Sequence[int], block_size: int) -> int:
    """The cache slot of a decode token: the last of its sequence's seq_len tokens."""
    return cache_slot(block_table, seq_len - 1, block_size)


class DecodeInputBuffers:
    """The graphs' inputs: input_ids, positions, slot_mapping, seq_lens [max_num_seqs] and block_tables
    [max_num_seqs, max_blocks_per_seq], allocated once.

    The first four are views of one int32 device buffer that also stages the step's block tables
    (packed at the step's width), with a pinned host mirror of the same layout: a step is one
    host-to-device copy of the mirror's used prefix, then one device copy that spreads the staged tables
    into their rows. query_start_loc is constant: row i is sequence i's only token."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        if max_num_seqs < 1 or max_blocks_per_seq < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_blocks_per_seq ({max_blocks_per_seq}) "
                             f"must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        # In int32 elements: three int64 fields (two elements each), seq_lens, then the staged tables,
        # each field starting 16-byte aligned (the row count rounded up to a multiple of 4).
        self._stride = -(-max_num_seqs // 4) * 4
        self._tables_offset = 7 * self._stride
        size = self._tables_offset + max_num_seqs * max_blocks_per_seq
        on_cuda = device.type == "cuda"
        self._device = torch.zeros(size, dtype=torch.int32, device=device)
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=on_cuda)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self._fields(self._device)
        self._host_fields = self._fields(self._host)
        self.slot_mapping.fill_(-1)  # before the first step too: warm-up and capture write nothing
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)
        # The mirror is rewritten only once the previous step's copy out of it has completed.
        self._copied = torch.cuda.Event() if on_cuda else None

    def _fields(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slot_mapping, seq_lens) of max_num_seqs rows, views of buffer."""
        n, stride = self.max_num_seqs, self._stride
        return (buffer[0:2 * n].view(torch.int64), buffer[2 * stride:2 * stride + 2 * n].view(torch.int64),
                buffer[4 * stride:4 * stride + 2 * n].view(torch.int64), buffer[6 * stride:6 * stride + n])

    def fill(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
             seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], padded_size: int) -> None:
        """Rows [0, len(input_ids)) get the step's sequences, rows up to padded_size the padding."""
        num_seqs = len(input_ids)
        if not num_seqs == len(positions) == len(slot_mapping) == len(seq_lens) == len(block_tables):
            raise ValueError(f"{num_seqs} input_ids, {len(positions)} positions, {len(slot_mapping)} slots, "
                             f"{len(seq_lens)} seq_lens and {len(block_tables)} block tables: one of each "
                             f"per sequence")
        if not 0 < num_seqs <= padded_size <= self.max_num_seqs:
            raise ValueError(f"need 0 < num_seqs ({num_seqs}) <= padded_size ({padded_size}) <= "
                             f"max_num_seqs ({self.max_num_seqs})")
        width = max(len(table) for table in block_tables)
        if width > self.max_blocks_per_seq:
            raise ValueError(f"a block table has {width} blocks, more than max_blocks_per_seq "
                             f"{self.max_blocks_per_seq}")
        if self._copied is not None:
            self._copied.synchronize()
        ids, pos, slots, lens = self._host_fields
        for field, values, pad in ((ids, input_ids, 0), (pos, positions, 0), (slots, slot_mapping, -1),
                                   (lens, seq_lens, 0)):
            field[:num_seqs] = torch.tensor(values, dtype=field.dtype)
            field[num_seqs:padded_size] = pad
        # Only the entries the tables have are written: padded rows and the columns past a table's end
        # keep stale ids, never read (seq_len bounds the reads). Python touches the used entries only.
        staged = self._tables_offset + padded_size * width
        tables = self._host[self._tables_offset:staged].view(padded_size, width)
        lengths = torch.tensor([len(table) for table in block_tables])
        tables[:num_seqs][torch.arange(width) < lengths[:, None]] = torch.tensor(
            list(itertools.chain.from_iterable(block_tables)), dtype=torch.int32)
        self._device[:staged].copy_(self._host[:staged], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.block_tables[:padded_size, :width].copy_(
            self._device[self._tables_offset:staged].view(padded_size, width))

    def metadata(self, padded_size: int, workspace: Optional[torch.Tensor]) -> AttentionMetadata:
        """The attention metadata of a captured batch of padded_size rows (views, filled by fill())."""
        return AttentionMetadata(query_start_loc=self.query_start_loc[:padded_size + 1],
                                 seq_lens=self.seq_lens[:padded_size],
                                 block_tables=self.block_tables[:padded_size],
                                 slot_mapping=self.slot_mapping[:padded_size],
                                 max_query_len=1, workspace=workspace)


class DecodeGraphs:
    """One captured forward per batch size of `sizes`, sharing one memory pool."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], buffers: DecodeInputBuffers,
                 workspace: Optional[torch.Tensor], sizes: Sequence[int]) -> None:
        if buffers.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {buffers.device}")
        if not sizes or max(sizes) > buffers.max_num_seqs:
            raise ValueError(f"capture sizes {list(sizes)} must be non-empty and at most the buffers' "
                             f"max_num_seqs {buffers.max_num_seqs}")
        self.sizes = sorted(sizes)
        self.buffers = buffers
        self.num_replays = 0
        self.pool_bytes = 0  # device memory the capture took (graph pool and graph objects)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(model, kv_caches, workspace)

    @torch.inference_mode()
    def _capture(self, model: nn.Module, kv_caches: list[torch.Tensor],
                 workspace: Optional[torch.Tensor]) -> None:
        start = time.perf_counter()
        device = self.buffers.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free_before, _ = torch.cuda.mem_get_info(device)
        pool = torch.cuda.graph_pool_handle()
        stream = _capture_stream(torch.cuda.current_device() if device.index is None else device.index)
        b = self.buffers
        with _debug_checks_off():
            # Largest first: the smaller graphs' intermediates then fit in what the pool already holds.
            for size in reversed(self.sizes):
                args = (b.input_ids[:size], b.positions[:size], kv_caches, b.metadata(size, workspace))
                # Warm-up outside the capture, on its stream: lazy initializations (the cuBLAS workspace
                # of that stream, kernel attributes, module loading) must not happen inside it.
                with torch.cuda.stream(stream):
                    model(*args)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                # One stream for every capture: graphs sharing a pool must be captured on the same one.
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden_states = model(*args)
                self._graphs[size] = (graph, hidden_states)
        torch.cuda.empty_cache()
        free_after, _ = torch.cuda.mem_get_info(device)
        self.pool_bytes = max(free_before - free_after, 0)
        logger.info("captured CUDA graphs of decode steps for batch sizes %s in %.2f s; they take %.1f MiB",
                    self.sizes, time.perf_counter() - start, self.pool_bytes / 2**20)

    def padded_size(self, num_seqs: int) -> Optional[int]:
        """The captured batch size a decode step of num_seqs sequences runs at; None: run it eagerly."""
        return padded_batch_size(num_seqs, self.sizes)

    def replay(self, padded_size: int) -> torch.Tensor:
        """Run the graph of padded_size rows on the buffers as fill() left them. Returns its hidden states
        [padded_size, hidden_size]: graph memory, valid until the next replay."""
        graph, hidden_states = self._graphs[padded_size]
        graph.replay()
        self.num_replays += 1
        return hidden_states


@functools.cache
def _capture_stream(device_index: int) -> torch.cuda.Stream:
    """One capture stream a device for the whole process: torch keeps a cuBLAS workspace for every
    stream cuBLAS has run on, so engines built one after the other (tests build many) share one."""
    return torch.cuda.Stream(device_index)


@contextlib.contextmanager
def _debug_checks_off() -> Iterator[None]:
    """The ops' debug checks copy metadata to the host, which a capture forbids; replays run no host
    code, so they would never check anything anyway."""
    previous = _ops.debug_checks_enabled()
    _ops.set_debug_checks(False)
    try:
        yield
    finally:
        _ops.set_debug_checks(previous)
