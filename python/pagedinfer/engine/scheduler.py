"""The scheduler: one token budget per step, shared by decodes, prompt chunks and new requests (V1-style).

A step is `schedule()` → the model runner computes the scheduled tokens and samples → `update()`.
Every sequence is handled the same way: it has tokens (prompt + outputs) of which `num_computed_tokens`
have their KV in the cache, and a step computes the rest or a chunk of it; when a step reaches its last
token, a token is sampled. A prompt is thus a long first step, cut into chunks when it exceeds the
budget, and a preempted sequence recomputes its prompt and outputs the same way.

With preemption_mode="swap", a preempted sequence's blocks go to the CPU swap space instead (when it
holds them alone and they fit: else it is recomputed), and come back before the step that resumes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedinfer.engine.block_manager import BlockManager
from pagedinfer.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: tokens [num_computed_tokens, + num_new_tokens) of `seq.token_ids`
    at those positions, KV slots from `seq.block_table`."""

    seq: Sequence
    num_computed_tokens: int
    num_new_tokens: int
    # Tokens to sample from the logits of the step's last token: 0 mid-prompt, 1 usually, and best_of
    # where a request's first sequence completes its prompt (update() forks the siblings).
    num_samples: int

    @property
    def new_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.num_computed_tokens:self.num_computed_tokens + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    num_batched_tokens: int
    # (src, dst) block pairs for copy_blocks, to run before the forward.
    blocks_to_copy: list[tuple[int, int]]
    # Sequences preempted this step (blocks freed or swapped out; they wait to be resumed).
    preempted: list[Sequence]
    # (device, cpu) and (cpu, device) block pairs for swap_blocks, run in this order before the copies.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        # An empty step is skipped, so it must move no blocks: a preemption or fork always comes with a
        # sequence scheduled in the same step (one sequence alone always fits the cache).
        assert self.scheduled or not (self.blocks_to_swap_out or self.blocks_to_swap_in
                                      or self.blocks_to_copy), "a step that moves blocks schedules nothing"
        return not self.scheduled


def verify_kv_cache_fits(max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Fail at start, naming a max_model_len that fits, if the cache cannot hold one full sequence."""
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        raise ValueError(f"the KV cache holds {num_blocks} blocks x {block_size} tokens = {capacity} "
                         f"tokens, less than one sequence of max_model_len={max_model_len}: set "
                         f"max_model_len to {capacity} or less, or give the KV cache more memory")


class Scheduler:
    def __init__(self, *, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, enable_prefix_caching: bool = True,
                 preemption_mode: str = "recompute", num_cpu_blocks: int = 0) -> None:
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        # Every running sequence's decode token must fit in one step's budget.
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({max_num_seqs})")
        verify_kv_cache_fits(max_model_len, num_blocks, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, num_cpu_blocks)
        # FCFS; preempted sequences go back to the front.
        self.waiting: deque[Sequence] = deque()
        # In the order they were admitted.
        self.running: list[Sequence] = []
        # Swapped out, by arrival: resumed before any waiting sequence is admitted.
        self.swapped: list[Sequence] = []
        self.requests: dict[str, SequenceGroup] = {}
        # Preemptions of either kind; of those, sequences swapped out, and sequences swapped back in.
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    def add_request(self, group: SequenceGroup) -> None:
        num_prompt_tokens = len(group.prompt_token_ids)
        if group.request_id in self.requests:
            raise ValueError(f"request_id {group.request_id!r} is already in use")
        if num_prompt_tokens == 0:
            raise ValueError("the prompt must contain at least one token")
        if num_prompt_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        if group.best_of > self.max_num_seqs:
            raise ValueError(f"best_of (or n) = {group.best_of} is more than "
                             f"max_num_seqs={self.max_num_seqs}")
        self.requests[group.request_id] = group
        self.waiting.extend(group.seqs)

    def abort_request(self, request_id: str) -> SequenceGroup | None:
        """Finish every sequence of the request as aborted; None if it is unknown or already finished."""
        group = self.requests.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.is_finished:
                self.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
        return group

    def finish_sequence(self, seq: Sequence, status: SequenceStatus,
                        stop_reason: int | str | None = None) -> None:
        """End a sequence and free its blocks: the engine's way to stop on a stop string. A sequence
        that is already finished only takes the new status and reason."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        elif not seq.is_finished:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.stop_reason = status, stop_reason
        if seq.group.is_finished:
            self.requests.pop(seq.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        blocks_to_copy: list[tuple[int, int]] = []
        blocks_to_swap_out: list[tuple[int, int]] = []
        blocks_to_swap_in: list[tuple[int, int]] = []

        # Running sequences first: decodes (one token each), then the next chunks of unfinished prompts.
        decodes = [seq for seq in self.running if seq.num_uncomputed_tokens == 1]
        prefills = [seq for seq in self.running if seq.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older sequence
                continue
            num_new_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new_tokens, scheduled, preempted, blocks_to_swap_out):
                continue
            blocks_to_copy += self.block_manager.append_slots(seq, num_new_tokens)
            scheduled.append(self._schedule(seq, num_new_tokens))
            budget -= num_new_tokens

        # Swapped, then new (and preempted) requests only when no preemption was needed: memory is short
        # otherwise. Waiting ones only once every swapped one is back, so none of those starves.
        if not preempted:
            budget = self._resume_swapped(budget, scheduled, blocks_to_copy, blocks_to_swap_in)
            if not self.swapped:
                budget = self._admit_waiting(budget, scheduled)

        return SchedulerOutput(scheduled=scheduled,
                               num_batched_tokens=self.max_num_batched_tokens - budget,
                               blocks_to_copy=blocks_to_copy, preempted=preempted,
                               blocks_to_swap_out=blocks_to_swap_out, blocks_to_swap_in=blocks_to_swap_in)

    def update(self, output: SchedulerOutput, sampled_token_ids: list[list[int]]) -> list[Sequence]:
        """Record a step: `sampled_token_ids[i]` holds the `output.scheduled[i].num_samples` tokens
        sampled for that entry. Advances the computed tokens, forks siblings, appends the tokens and
        finishes sequences on EOS, stop tokens, max_tokens and max_model_len (stop strings are the
        engine's: `finish_sequence`). Returns the sequences that got a token, in the order of the
        flattened `sampled_token_ids` (a forking sequence is followed by its new siblings)."""
        if len(sampled_token_ids) != len(output.scheduled) or any(
                len(tokens) != entry.num_samples
                for entry, tokens in zip(output.scheduled, sampled_token_ids)):
            raise ValueError("sampled_token_ids must hold num_samples tokens for each scheduled sequence")
        received = []
        for entry, token_ids in zip(output.scheduled, sampled_token_ids):
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted after it was scheduled
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            family = [seq] + [self._fork(seq) for _ in token_ids[1:]]
            for member, token_id in zip(family, token_ids):
                member.append_token(token_id)
                self._check_stop(member)
                received.append(member)
        return received

    def _make_room(self, seq: Sequence, num_new_tokens: int, scheduled: list[ScheduledSequence],
                   preempted: list[Sequence], blocks_to_swap_out: list[tuple[int, int]]) -> bool:
        """Preempt the newest running sequences not scheduled this step until `seq`'s new tokens fit.
        False when `seq` itself was the newest and had to go."""
        while not self.block_manager.can_append_slots(seq, num_new_tokens):
            busy = {entry.seq for entry in scheduled}
            victim = max((s for s in self.running if s not in busy), key=lambda s: s.arrival_key)
            if self.preemption_mode == "swap" and self.block_manager.can_swap_out(victim):
                blocks_to_swap_out += self._swap_out(victim)
            else:
                self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: free the blocks, keep the outputs; its tokens are computed again when
        rescheduled. Victims come newest first, so pushing each to the front keeps arrival order."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Preempt by swapping: the blocks go to the CPU pool, the progress is kept."""
        self.running.remove(seq)
        mapping = self.block_manager.swap_out(seq)
        seq.status = SequenceStatus.SWAPPED
        self.swapped.append(seq)
        self.swapped.sort(key=lambda s: s.arrival_key)
        self.num_preemptions += 1
        self.num_swap_outs += 1
        return mapping

    def _resume_swapped(self, budget: int, scheduled: list[ScheduledSequence],
                        blocks_to_copy: list[tuple[int, int]],
                        blocks_to_swap_in: list[tuple[int, int]]) -> int:
        """Swap sequences back in, oldest first, and schedule their next tokens."""
        num_seq_slots = sum(self._seq_slots(seq) for seq in self.running)
        while self.swapped and budget > 0:
            seq = self.swapped[0]
            num_new_tokens = min(seq.num_uncomputed_tokens, budget)
            if (num_seq_slots + self._seq_slots(seq) > self.max_num_seqs
                    or not self.block_manager.can_swap_in(seq, num_new_tokens)):
                break  # FCFS: later ones wait behind this one
            blocks_to_swap_in += self.block_manager.swap_in(seq)
            blocks_to_copy += self.block_manager.append_slots(seq, num_new_tokens)
            self.swapped.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.num_swap_ins += 1
            num_seq_slots += self._seq_slots(seq)
            scheduled.append(self._schedule(seq, num_new_tokens))
            budget -= num_new_tokens
        return budget

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        num_seq_slots = sum(self._seq_slots(seq) for seq in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seq_slots + self._seq_slots(seq) > self.max_num_seqs:
                break
            num_cached_tokens = self.block_manager.cached_prefix_length(seq)
            num_new_tokens = min(seq.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_cached_tokens + num_new_tokens):
                break  # FCFS: later requests wait behind this one
            self.block_manager.allocate(seq, num_cached_tokens + num_new_tokens)
            self.waiting.popleft()
            if seq.status is SequenceStatus.WAITING:
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seq_slots += self._seq_slots(seq)
            scheduled.append(self._schedule(seq, num_new_tokens))
            budget -= num_new_tokens
        return budget

    def _seq_slots(self, seq: Sequence) -> int:
        """Running-sequence slots it takes: a first sequence reserves room for the siblings it forks."""
        return 1 + seq.group.num_siblings_to_fork

    def _schedule(self, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            seq.num_prefill_chunks += 1
        completes = seq.num_computed_tokens + num_new_tokens == seq.num_tokens
        return ScheduledSequence(seq, seq.num_computed_tokens, num_new_tokens,
                                 num_samples=1 + seq.group.num_siblings_to_fork if completes else 0)

    def _fork(self, parent: Sequence) -> Sequence:
        child = parent.group.fork(parent)
        self.block_manager.fork(parent, child)
        self.running.append(child)
        return child

    def _check_stop(self, seq: Sequence) -> None:
        params = seq.sampling_params
        token_id = seq.last_token_id
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and token_id in seq.group.eos_token_ids and not params.ignore_eos:
            self.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED)
        elif may_stop and token_id in params.stop_token_ids:
            self.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop_reason=token_id)
        elif ((params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
              or seq.num_tokens >= self.max_model_len):
            self.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
