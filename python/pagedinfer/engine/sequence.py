"""Requests and their sequences: what the scheduler schedules and the block manager gives blocks to."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pagedinfer.sampling_params import SamplingParams

# Process-wide counters: sequence ids are unique, and requests added in one clock tick still have an order.
_next_seq_id = itertools.count()
_next_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()            # not scheduled yet
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()          # its blocks were taken back: waits to recompute prompt and outputs
    SWAPPED = enum.auto()            # its blocks wait in the CPU swap space to be swapped back in
    FINISHED_STOPPED = enum.auto()   # EOS, a stop token or a stop string
    FINISHED_LENGTH = enum.auto()    # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI/vLLM name: "stop", "length", "abort"; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                   SequenceStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)
class Sequence:
    """One continuation of a request. `token_ids` is the prompt followed by the outputs so far."""

    group: SequenceGroup = field(repr=False)
    index: int
    token_ids: list[int] = field(repr=False)
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_next_seq_id))
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose KV is in the cache; each step computes the rest, or a chunk of it.
    num_computed_tokens: int = 0
    # Prefix-cache hits when first scheduled (a sequence resumed after preemption keeps this count).
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list, repr=False)
    # Chain hashes of its full blocks of tokens, filled in lazily by the block manager.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    stop_reason: int | str | None = None
    # Sum of its sampled tokens' logprobs, kept by the engine: best_of ranks siblings by it.
    cumulative_logprob: float = 0.0
    # Steps that computed prompt tokens: a prompt longer than the token budget takes several.
    num_prefill_chunks: int = 0

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @property
    def sampling_params(self) -> SamplingParams:
        return self.group.sampling_params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.group.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet: 1 for a decode, more for a prompt (or a recompute)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def arrival_key(self) -> tuple[int, int]:
        """Orders sequences by their request's arrival, siblings by index: the largest is the newest."""
        return self.group.arrival_order, self.index

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


@dataclass(eq=False)
class SequenceGroup:
    """A request: prompt, sampling parameters and sequences. It starts with one sequence; when that one
    completes the prompt, the best_of (or n) - 1 siblings fork from it, sharing its blocks."""

    request_id: str
    prompt_token_ids: list[int] = field(repr=False)
    sampling_params: SamplingParams = field(repr=False)
    # Any of them ends a sequence (unless ignore_eos): ModelConfig.eos_token_ids.
    eos_token_ids: tuple[int, ...] = ()
    # Keys the sampling noise: sampling_params.seed, or one the engine drew for the request.
    seed: int = 0
    prompt: str | None = field(default=None, repr=False)
    arrival_time: float = field(default_factory=time.time)
    arrival_order: int = field(init=False, default_factory=lambda: next(_next_arrival))
    seqs: list[Sequence] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.seqs = [Sequence(self, 0, list(self.prompt_token_ids), len(self.prompt_token_ids))]

    @property
    def best_of(self) -> int:
        """How many sequences the request samples (n of them are returned)."""
        return self.sampling_params.best_of or self.sampling_params.n

    @property
    def num_siblings_to_fork(self) -> int:
        return self.best_of - len(self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return self.seqs[0].num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def fork(self, parent: Sequence) -> Sequence:
        """A new sibling with the parent's tokens and progress; the block manager shares the blocks."""
        child = Sequence(self, len(self.seqs), list(parent.token_ids), parent.num_prompt_tokens,
                         status=parent.status, num_computed_tokens=parent.num_computed_tokens,
                         num_cached_tokens=parent.num_cached_tokens,
                         block_hashes=list(parent.block_hashes),
                         cumulative_logprob=parent.cumulative_logprob)
        self.seqs.append(child)
        return child

    def select_outputs(self) -> list[Sequence]:
        """The n sequences to return: all of them in order, or with best_of > n the n most likely
        (by cumulative logprob; rank only once all are finished)."""
        n = self.sampling_params.n
        if len(self.seqs) <= n:
            return list(self.seqs)
        return sorted(self.seqs, key=lambda seq: seq.cumulative_logprob, reverse=True)[:n]
