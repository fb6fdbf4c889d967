"""The model runner: a scheduled step in, sampled tokens and logprobs out (as host lists).

It owns the model, the KV cache and the sampler. A step is: swap blocks out to the CPU swap pool and
back in, copy the blocks of forked sequences, build the flat batch of new tokens with their positions
and attention metadata, run the model, and compute logits only where they are needed (the last token
of each entry that samples, and prompt tokens whose logprobs were asked for).

On CUDA the KV cache is sized by profiling the largest step (memory_profiler), and decode steps (every
sequence bringing one new token) replay CUDA graphs captured once the cache exists (cuda_graphs),
unless enforce_eager is set. Other steps run eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional

import torch

from pagedinfer import _ops
from pagedinfer.attention import AttentionMetadata
from pagedinfer.config import EngineConfig
from pagedinfer.engine.scheduler import ScheduledSequence, SchedulerOutput
from pagedinfer.layers.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from pagedinfer.models.loader import load_model
from pagedinfer.sampling_params import SamplingParams
from pagedinfer.worker.cache_engine import CacheEngine, num_kv_blocks, num_swap_blocks
from pagedinfer.worker.cuda_graphs import DecodeGraphs, DecodeInputBuffers, capture_batch_sizes, decode_slot
from pagedinfer.worker.memory_profiler import graph_pool_reserve_bytes, num_gpu_kv_blocks, profile_gpu_memory

logger = logging.getLogger(__name__)


@dataclass
class TokenLogprobs:
    """Host lists, one row per token: the token, its logprob and rank (1 = most likely) under the raw
    logits, and the top-k alternatives (empty rows when none were asked for)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[float]]
    top_token_ids: list[list[int]]

    @classmethod
    def from_tensors(cls, token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                     top_logprobs: Optional[torch.Tensor], top_token_ids: Optional[torch.Tensor]
                     ) -> TokenLogprobs:
        no_top = [[] for _ in range(len(token_ids))]
        return cls(token_ids.tolist(), logprobs.tolist(), ranks.tolist(),
                   no_top if top_logprobs is None else top_logprobs.tolist(),
                   no_top if top_token_ids is None else top_token_ids.tolist())


@dataclass
class PromptLogprobsChunk:
    """prompt_logprobs of the prompt tokens [first_position, first_position + len) of one entry."""

    entry_index: int  # in SchedulerOutput.scheduled
    first_position: int
    logprobs: TokenLogprobs


@dataclass
class StepResult:
    # One row per sampled token: the entries with num_samples > 0 in schedule order, num_samples rows
    # each (a forking sequence first, then its new siblings).
    sampled: TokenLogprobs
    prompt_logprobs: list[PromptLogprobsChunk]


@dataclass
class _StepInputs:
    input_ids: Optional[torch.Tensor]         # [num_tokens] int64 (None: in the graph buffers)
    positions: Optional[torch.Tensor]         # [num_tokens] int64 (None: in the graph buffers)
    metadata: Optional[AttentionMetadata]     # None: in the graph buffers
    first_rows: list[int]                     # each entry's first row in the flat batch
    sample_rows: list[int]                    # the row each sampled token's logits come from (repeated
                                              # when forking)
    graph_batch_size: Optional[int] = None    # the captured batch size a decode step replays; None: eager


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        model_config, cache_config, scheduler = config.model, config.cache, config.scheduler
        self.config = config
        self.device = config.device
        self.model = load_model(model_config, config.device, config.load_format, config.seed)
        on_cuda = config.device.type == "cuda"
        weights_bytes = torch.cuda.memory_allocated(config.device) if on_cuda else 0
        max_blocks_per_seq = -(-model_config.max_model_len // cache_config.block_size)
        # Sized for the largest batch, it serves every smaller one (captured graphs included).
        self.workspace = _ops.paged_attention_workspace(
            scheduler.max_num_seqs, model_config.num_attention_heads, model_config.num_key_value_heads,
            model_config.head_dim, max_blocks_per_seq, cache_config.block_size, config.device)
        use_graphs = on_cuda and not config.enforce_eager
        # Sized after loading: on CUDA the cache takes what the weights, a step's peak and the graphs
        # (captured later: they need the cache) leave.
        capture_sizes = capture_batch_sizes(scheduler.max_num_seqs)
        graph_reserve = graph_pool_reserve_bytes(model_config, capture_sizes[-1]) if use_graphs else 0
        profiled = on_cuda and cache_config.num_gpu_blocks is None
        if profiled:
            profile = profile_gpu_memory(self.model, config, weights_bytes, self.workspace)
            num_blocks = num_gpu_kv_blocks(profile, config, graph_reserve)
        else:
            num_blocks = num_kv_blocks(model_config, cache_config)
        self.cache = CacheEngine(model_config, num_blocks, cache_config.block_size, config.device,
                                 num_swap_blocks(model_config, cache_config, scheduler))
        self.sampler = Sampler()
        # Prompt logprobs take this many rows of logits at a time: never more than the profiled step's.
        self.prompt_logprobs_rows = scheduler.max_num_seqs
        self.decode_graphs: Optional[DecodeGraphs] = None
        if use_graphs:
            buffers = DecodeInputBuffers(capture_sizes[-1], max_blocks_per_seq, config.device)
            self.decode_graphs = DecodeGraphs(self.model, self.cache.kv_caches, buffers, self.workspace,
                                              capture_sizes)
            if profiled and self.decode_graphs.pool_bytes > graph_reserve:
                logger.warning("the CUDA graphs took %.1f MiB, more than the %.1f MiB reserved for them: "
                               "lower gpu_memory_utilization if memory runs out",
                               self.decode_graphs.pool_bytes / 2**20, graph_reserve / 2**20)

    @property
    def num_graph_replays(self) -> int:
        """Decode steps that ran as a CUDA graph replay so far."""
        return 0 if self.decode_graphs is None else self.decode_graphs.num_replays

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepResult:
        # Swap-outs first: the step may hand their device blocks to swap-ins or new tokens.
        self.cache.swap_out(step.blocks_to_swap_out)
        self.cache.swap_in(step.blocks_to_swap_in)
        # Before the forward: a forked sequence writes into its own copy of a shared partial block.
        self.cache.copy(step.blocks_to_copy)
        inputs = self._prepare_inputs(step)
        hidden_states = self._forward(inputs)
        return StepResult(self._sample(step, inputs, hidden_states),
                          self._prompt_logprobs(step, inputs, hidden_states))

    def _prepare_inputs(self, step: SchedulerOutput) -> _StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        first_rows, sample_rows = [], []
        for entry in step.scheduled:
            first_rows.append(len(input_ids))
            input_ids += entry.new_token_ids
            positions += range(entry.num_computed_tokens, entry.num_computed_tokens + entry.num_new_tokens)
            sample_rows += [len(input_ids) - 1] * entry.num_samples
        seq_lens = [e.num_computed_tokens + e.num_new_tokens for e in step.scheduled]
        block_tables = [e.seq.block_table for e in step.scheduled]
        # A decode step (one new token a sequence) replays the graph of the smallest batch that holds it.
        is_decode = all(e.num_new_tokens == 1 for e in step.scheduled)
        padded_size = (self.decode_graphs.padded_size(len(step.scheduled))
                       if self.decode_graphs is not None and is_decode else None)
        if padded_size is not None:
            block_size = self.cache.block_size
            self.decode_graphs.buffers.fill(
                input_ids, positions, [decode_slot(n, t, block_size) for n, t in zip(seq_lens, block_tables)],
                seq_lens, block_tables, padded_size)
            return _StepInputs(None, None, None, first_rows, sample_rows, padded_size)
        metadata = AttentionMetadata.build(
            seq_lens=seq_lens, query_lens=[e.num_new_tokens for e in step.scheduled],
            block_tables=block_tables, block_size=self.cache.block_size, device=self.device,
            workspace=self.workspace)
        return _StepInputs(torch.tensor(input_ids, dtype=torch.int64, device=self.device),
                           torch.tensor(positions, dtype=torch.int64, device=self.device),
                           metadata, first_rows, sample_rows)

    def _forward(self, inputs: _StepInputs) -> torch.Tensor:
        """Hidden states [rows, hidden_size]: the step's tokens first (a graph's padded rows after)."""
        if inputs.graph_batch_size is not None:
            return self.decode_graphs.replay(inputs.graph_batch_size)
        return self.model(inputs.input_ids, inputs.positions, self.cache.kv_caches, inputs.metadata)

    def _sample(self, step: SchedulerOutput, inputs: _StepInputs,
                hidden_states: torch.Tensor) -> TokenLogprobs:
        rows = [row for entry in step.scheduled for row in _sample_rows(entry)]
        if not rows:  # every entry was a prompt chunk short of its end
            return TokenLogprobs([], [], [], [], [])
        batch = SamplingBatch.build(
            params=[row.params for row in rows], seeds=[row.seed for row in rows],
            offsets=[row.offset for row in rows], prompt_ids=[row.prompt_ids for row in rows],
            output_ids=[row.output_ids for row in rows], banned=[row.banned for row in rows],
            vocab_size=self.config.model.vocab_size, device=self.device)
        row_index = torch.tensor(inputs.sample_rows, device=self.device)
        out = self.sampler(self.model.compute_logits(hidden_states[row_index]), batch)
        return TokenLogprobs.from_tensors(out.token_ids, out.logprobs, out.ranks, out.top_logprobs,
                                          out.top_token_ids)

    def _prompt_logprobs(self, step: SchedulerOutput, inputs: _StepInputs,
                         hidden_states: torch.Tensor) -> list[PromptLogprobsChunk]:
        chunks = []
        for index, (entry, first_row) in enumerate(zip(step.scheduled, inputs.first_rows)):
            seq = entry.seq
            # Only the first computation of the prompt: siblings and resumed sequences have outputs.
            if seq.sampling_params.prompt_logprobs is None or seq.num_output_tokens:
                continue
            # The logits at position p score prompt token p + 1; the last prompt token scores an output.
            start = entry.num_computed_tokens
            end = min(start + entry.num_new_tokens, seq.num_prompt_tokens - 1)
            if end <= start:
                continue
            chunks.append(PromptLogprobsChunk(index, start + 1, self._prompt_token_logprobs(
                hidden_states[first_row:first_row + end - start], seq.token_ids[start + 1:end + 1],
                seq.sampling_params.prompt_logprobs)))
        return chunks

    def _prompt_token_logprobs(self, hidden_states: torch.Tensor, next_ids: list[int],
                               num_logprobs: int) -> TokenLogprobs:
        """Logprobs of next_ids[i] under the logits of hidden_states[i], prompt_logprobs_rows rows at a
        time: a whole prompt chunk's [rows, vocab] float32 logits would outgrow the profiled step."""
        parts = []
        for first in range(0, len(next_ids), self.prompt_logprobs_rows):
            last = first + self.prompt_logprobs_rows
            ids = torch.tensor(next_ids[first:last], device=self.device)
            logits = self.model.compute_logits(hidden_states[first:last])
            parts.append(TokenLogprobs.from_tensors(ids, *compute_prompt_logprobs(logits, ids, num_logprobs)))
        return TokenLogprobs(*([row for part in parts for row in getattr(part, field.name)]
                               for field in fields(TokenLogprobs)))


@dataclass
class _SampleRow:
    params: SamplingParams
    seed: int
    offset: int
    prompt_ids: list[int]
    output_ids: list[int]
    banned: list[int]


def _sample_rows(entry: ScheduledSequence) -> list[_SampleRow]:
    """The entry's num_samples rows. Sampling noise is keyed by (request seed, sibling index, output
    position) alone, so a token does not depend on the batch it was sampled in, nor on preemption."""
    if not entry.num_samples:
        return []
    seq, group = entry.seq, entry.seq.group
    params = seq.sampling_params
    # A forking sequence's extra samples go to the siblings fork() is about to create, in this order.
    siblings = [seq.index, *range(len(group.seqs), len(group.seqs) + entry.num_samples - 1)]
    # While min_tokens is not reached, the tokens that would stop the sequence are banned.
    banned: list[int] = []
    if seq.num_output_tokens < params.min_tokens:
        banned = params.stop_token_ids + ([] if params.ignore_eos else list(group.eos_token_ids))
    return [_SampleRow(params, group.seed, (sibling << 32) | seq.num_output_tokens,
                       group.prompt_token_ids, seq.output_token_ids, banned)
            for sibling in siblings]
