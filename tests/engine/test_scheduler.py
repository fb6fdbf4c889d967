"""Scheduler: one token budget per step, chunked prefill, preemption by recompute or swap, fan-out, stops.

`FakeModel` stands in for the model runner: it stores token ids as the "KV" of a paged cache (swapping
and copying blocks as told), reads every sequence's context back through its block table, checks it is that
sequence's tokens, and samples a token that depends on the context read. A wrong block table, a missed
copy or a bad prefix-cache hit therefore fails a check or changes the outputs.
"""

import random
import zlib
from array import array

import pytest

from pagedinfer.engine.scheduler import Scheduler, SchedulerOutput, verify_kv_cache_fits
from pagedinfer.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedinfer.sampling_params import SamplingParams

VOCAB = 64


def next_token(context: list[int], sample_index: int) -> int:
    return zlib.crc32(array("q", context).tobytes() + bytes([sample_index])) % VOCAB


class FakeModel:
    def __init__(self, scheduler: Scheduler) -> None:
        self.block_size = scheduler.block_manager.block_size
        self.cache: list[list[int | None]] = [[None] * self.block_size
                                              for _ in range(scheduler.block_manager.num_blocks)]
        self.cpu_cache: list[list[int | None]] = [[None] * self.block_size
                                                  for _ in range(scheduler.block_manager.num_cpu_blocks)]

    def slot(self, seq: Sequence, position: int) -> tuple[list[int | None], int]:
        return self.cache[seq.block_table[position // self.block_size]], position % self.block_size

    def run(self, output: SchedulerOutput) -> list[list[int]]:
        for src, dst in output.blocks_to_swap_out:
            self.cpu_cache[dst] = list(self.cache[src])
        for src, dst in output.blocks_to_swap_in:
            self.cache[dst] = list(self.cpu_cache[src])
        for src, dst in output.blocks_to_copy:
            self.cache[dst] = list(self.cache[src])
        for entry in output.scheduled:  # the step's KV is written before attention reads any
            for position, token_id in enumerate(entry.new_token_ids, start=entry.num_computed_tokens):
                block, offset = self.slot(entry.seq, position)
                block[offset] = token_id
        sampled = []
        for entry in output.scheduled:
            end = entry.num_computed_tokens + entry.num_new_tokens
            context = [block[offset] for block, offset in (self.slot(entry.seq, p) for p in range(end))]
            assert context == entry.seq.token_ids[:end], f"corrupt KV for sequence {entry.seq.seq_id}"
            sampled.append([next_token(context, i) for i in range(entry.num_samples)])
        return sampled


def make_scheduler(**overrides) -> Scheduler:
    config = dict(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                  max_model_len=128)
    return Scheduler(**(config | overrides))


def add(scheduler: Scheduler, request_id: str, prompt: list[int], eos_token_ids: tuple[int, ...] = (),
        **params) -> SequenceGroup:
    group = SequenceGroup(request_id, prompt, SamplingParams(**params), eos_token_ids=eos_token_ids)
    scheduler.add_request(group)
    return group


def check_invariants(scheduler: Scheduler, output: SchedulerOutput) -> None:
    assert output.num_batched_tokens == sum(e.num_new_tokens for e in output.scheduled)
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    manager = scheduler.block_manager
    if scheduler.preemption_mode == "recompute":
        assert not output.blocks_to_swap_in and not output.blocks_to_swap_out
    assert all(not seq.block_table for seq in scheduler.swapped)
    if not scheduler.swapped:
        assert manager.num_free_cpu_blocks == manager.num_cpu_blocks
    live = [seq for group in scheduler.requests.values() for seq in group.seqs if not seq.is_finished]
    queued = [*scheduler.running, *scheduler.waiting, *scheduler.swapped]
    assert sorted(s.seq_id for s in live) == sorted(s.seq_id for s in queued)
    references = [0] * manager.num_blocks
    for seq in live:
        for block in seq.block_table:
            references[block] += 1
    assert references == [manager.ref_count(block) for block in range(manager.num_blocks)]
    assert manager.num_free_blocks == references.count(0)


def step(scheduler: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Sequence]]:
    output = scheduler.schedule()
    check_invariants(scheduler, output)
    return output, scheduler.update(output, model.run(output))


def run_until_done(scheduler: Scheduler, model: FakeModel, max_steps: int = 2000) -> int:
    for num_steps in range(1, max_steps + 1):
        step(scheduler, model)
        if not scheduler.has_unfinished_requests():
            return num_steps
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def scripted_step(scheduler: Scheduler, token_id: int) -> SchedulerOutput:
    """A step where every sampled token is `token_id`."""
    output = scheduler.schedule()
    scheduler.update(output, [[token_id] * entry.num_samples for entry in output.scheduled])
    return output


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256)
    seq = add(scheduler, "long", list(range(100)), max_tokens=2).seqs[0]
    model = FakeModel(scheduler)
    shares = []
    for _ in range(5):
        output, _ = step(scheduler, model)
        shares.append([(e.num_new_tokens, e.num_samples) for e in output.scheduled])
    assert shares == [[(32, 0)], [(32, 0)], [(32, 0)], [(4, 1)], [(1, 1)]]
    assert seq.num_prefill_chunks == 4
    assert seq.is_finished and seq.num_output_tokens == 2


def test_decodes_first_then_prompt_chunks_then_new_requests():
    scheduler = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    model = FakeModel(scheduler)
    a = add(scheduler, "a", [1, 2, 3, 4], max_tokens=100).seqs[0]
    step(scheduler, model)
    b = add(scheduler, "b", list(range(40)), max_tokens=100).seqs[0]
    output, _ = step(scheduler, model)
    assert [(e.seq, e.num_new_tokens) for e in output.scheduled] == [(a, 1), (b, 15)]
    c = add(scheduler, "c", [7, 8, 9], max_tokens=100).seqs[0]
    output, _ = step(scheduler, model)
    assert [(e.seq, e.num_new_tokens) for e in output.scheduled] == [(a, 1), (b, 15)]  # no room for c
    output, _ = step(scheduler, model)
    assert [(e.seq, e.num_new_tokens, e.num_samples) for e in output.scheduled] == [
        (a, 1, 1), (b, 10, 1), (c, 3, 1)]
    output, _ = step(scheduler, model)
    assert [e.seq for e in output.scheduled] == [a, b, c] and output.num_batched_tokens == 3


def test_never_more_than_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(5):
        add(scheduler, str(i), [i, i, i], max_tokens=3)
    model = FakeModel(scheduler)
    output, _ = step(scheduler, model)
    assert len(output.scheduled) == 2 and len(scheduler.waiting) == 3
    run_until_done(scheduler, model)


def test_preemption_takes_the_newest_request_and_it_resumes():
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=16, max_model_len=12)
    model = FakeModel(scheduler)
    older = add(scheduler, "older", [1, 2, 3, 4], max_tokens=6).seqs[0]
    newer = add(scheduler, "newer", [5, 6, 7, 8, 9, 10], max_tokens=3).seqs[0]
    step(scheduler, model)  # both prompts: 1 + 2 blocks, the pool is full
    assert scheduler.block_manager.num_free_blocks == 0
    output, _ = step(scheduler, model)  # older needs a block for position 4: newer goes
    assert output.preempted == [newer] and scheduler.num_preemptions == 1
    assert [e.seq for e in output.scheduled] == [older]
    assert newer.status is SequenceStatus.PREEMPTED and scheduler.waiting[0] is newer
    assert newer.num_computed_tokens == 0 and newer.block_table == []
    assert newer.num_output_tokens == 1  # outputs are kept, to be recomputed
    run_until_done(scheduler, model)
    assert older.num_output_tokens == 6 and newer.num_output_tokens == 3
    assert newer.num_prefill_chunks == 2 and newer.num_cached_tokens == 0
    assert scheduler.block_manager.num_free_blocks == 3


def test_a_step_that_preempts_admits_nothing():
    # Memory is short: readmitting the sequence just preempted would only thrash.
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=5, max_num_seqs=2, max_model_len=12)
    model = FakeModel(scheduler)
    older = add(scheduler, "older", [1, 2, 3, 4], max_tokens=6).seqs[0]
    newer = add(scheduler, "newer", [5, 6, 7, 8, 9, 10], max_tokens=3).seqs[0]
    step(scheduler, model)  # older's prompt and newer's first token
    output, _ = step(scheduler, model)  # older's decode takes the last block; newer's chunk has none
    assert output.preempted == [newer] and [e.seq for e in output.scheduled] == [older]
    assert scheduler.block_manager.num_free_blocks == 1 and scheduler.waiting[0] is newer
    run_until_done(scheduler, model)


def test_swap_preemption_keeps_the_progress_and_resumes_first():
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=16, max_model_len=12,
                               preemption_mode="swap", num_cpu_blocks=2)
    model = FakeModel(scheduler)
    older = add(scheduler, "older", [1, 2, 3, 4], max_tokens=6).seqs[0]
    newer = add(scheduler, "newer", [5, 6, 7, 8, 9, 10], max_tokens=3).seqs[0]
    step(scheduler, model)  # both prompts: 1 + 2 blocks, the pool is full
    newer_blocks = list(newer.block_table)
    later = add(scheduler, "later", [11, 12]).seqs[0]
    output, _ = step(scheduler, model)  # older needs a block for position 4: newer is swapped out
    assert output.preempted == [newer] and [e.seq for e in output.scheduled] == [older]
    assert [device for device, _ in output.blocks_to_swap_out] == newer_blocks
    assert newer.status is SequenceStatus.SWAPPED and scheduler.swapped == [newer]
    assert newer.num_computed_tokens == 6 and newer.block_table == []
    assert scheduler.block_manager.num_free_cpu_blocks == 0
    assert scheduler.num_swap_outs == scheduler.num_preemptions == 1
    while newer.status is SequenceStatus.SWAPPED:
        assert later.status is SequenceStatus.WAITING, "admitted before the swapped request"
        output, _ = step(scheduler, model)
    # Resumed by a swap-in and a decode: nothing is recomputed (FakeModel checks the KV it reads).
    assert len(output.blocks_to_swap_in) == 2 and scheduler.num_swap_ins == 1
    assert [e.num_new_tokens for e in output.scheduled if e.seq is newer] == [1]
    run_until_done(scheduler, model)
    assert older.num_output_tokens == 6 and newer.num_output_tokens == 3
    assert newer.num_prefill_chunks == 1
    assert scheduler.block_manager.num_free_blocks == 3
    assert scheduler.block_manager.num_free_cpu_blocks == 2


@pytest.mark.parametrize("reason, num_cpu_blocks, n", [("the CPU pool is too small", 1, 1),
                                                      ("its blocks are shared with a sibling", 8, 2)])
def test_swap_falls_back_to_recompute(reason, num_cpu_blocks, n):
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=16, max_model_len=12,
                               preemption_mode="swap", num_cpu_blocks=num_cpu_blocks)
    model = FakeModel(scheduler)
    add(scheduler, "older", [1, 2, 3, 4], max_tokens=6)
    newer = add(scheduler, "newer", [5, 6, 7, 8, 9, 10], n=n, max_tokens=3)
    step(scheduler, model)
    output, _ = step(scheduler, model)
    victim = output.preempted[0]  # the newest: the last sibling
    assert victim is newer.seqs[-1] and victim.status is SequenceStatus.PREEMPTED, reason
    assert victim.num_computed_tokens == 0 and victim in scheduler.waiting
    run_until_done(scheduler, model)
    assert scheduler.block_manager.num_free_blocks == 3
    assert scheduler.block_manager.num_free_cpu_blocks == num_cpu_blocks


def make_workload(rng: random.Random, num_requests: int) -> list[tuple[str, list[int], dict]]:
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 13))] for _ in range(3)]
    workload = []
    for i in range(num_requests):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 10))]
        n = rng.choice([1, 1, 1, 2, 3])
        params = dict(n=n, max_tokens=rng.randrange(2, 24), min_tokens=rng.choice([0, 0, 2]),
                      stop_token_ids=[rng.randrange(VOCAB)])
        workload.append((f"r{i}", prompt, params))
    return workload


def outputs_of(groups: list[SequenceGroup]) -> dict:
    return {(g.request_id, s.index): (s.output_token_ids, s.finish_reason, s.stop_reason)
            for g in groups for s in g.seqs}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_do_not_change_with_chunking_preemption_and_prefix_caching(seed):
    workload = make_workload(random.Random(seed), num_requests=16)

    def run(**config) -> tuple[Scheduler, dict]:
        scheduler = make_scheduler(**config)
        groups = [add(scheduler, request_id, prompt, eos_token_ids=(0,), **params)
                  for request_id, prompt, params in workload]
        run_until_done(scheduler, FakeModel(scheduler))
        assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
        return scheduler, outputs_of(groups)

    _, roomy = run(num_blocks=512, max_num_batched_tokens=1024, max_num_seqs=64,
                   enable_prefix_caching=False)
    tight, outputs = run(num_blocks=12, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=48)
    assert outputs == roomy
    assert tight.num_preemptions > 0
    assert tight.block_manager.stats.hit_blocks > 0
    assert any(reason == "length" for _, reason, _ in outputs.values())
    swapping, outputs = run(num_blocks=12, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=48,
                            preemption_mode="swap", num_cpu_blocks=6)
    assert outputs == roomy
    assert swapping.num_swap_outs > 0 and swapping.num_swap_ins == swapping.num_swap_outs
    assert swapping.block_manager.num_free_cpu_blocks == 6


def test_shared_prefix_is_cached_and_reported():
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    first = add(scheduler, "first", list(range(10)), max_tokens=1)
    run_until_done(scheduler, model)
    second = add(scheduler, "second", list(range(9)) + [60], max_tokens=3)
    output, _ = step(scheduler, model)
    assert [(e.num_computed_tokens, e.num_new_tokens) for e in output.scheduled] == [(8, 2)]
    assert second.num_cached_tokens == 8 and first.num_cached_tokens == 0
    stats = scheduler.block_manager.stats
    assert (stats.hit_blocks, stats.hit_tokens) == (2, 8)
    run_until_done(scheduler, model)


def test_same_prompt_in_one_step_shares_full_blocks():
    scheduler = make_scheduler()
    a = add(scheduler, "a", list(range(9)), max_tokens=2)
    b = add(scheduler, "b", list(range(9)), max_tokens=2)
    output, _ = step(scheduler, FakeModel(scheduler))
    assert [e.num_new_tokens for e in output.scheduled] == [9, 1]
    assert b.num_cached_tokens == 8 and b.seqs[0].block_table[:2] == a.seqs[0].block_table[:2]


@pytest.mark.parametrize("prompt_len, num_copies", [(6, 2), (8, 0)])
def test_n_forks_siblings_that_share_the_prompt_blocks(prompt_len, num_copies):
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    group = add(scheduler, "n3", list(range(prompt_len)), n=3, max_tokens=4)
    output, received = step(scheduler, model)
    assert [e.num_samples for e in output.scheduled] == [3]
    assert received == group.seqs and [s.index for s in group.seqs] == [0, 1, 2]
    tables = [list(s.block_table) for s in group.seqs]
    assert tables[0] == tables[1] == tables[2]
    assert all(scheduler.block_manager.ref_count(b) == 3 for b in tables[0])
    assert all(s.num_cached_tokens == 0 and s.num_computed_tokens == prompt_len for s in group.seqs)

    output, _ = step(scheduler, model)
    # Copy-on-write: the first two writers into the shared partial block get copies, the last keeps it.
    partial = tables[0][-1]
    assert [src for src, _ in output.blocks_to_copy] == [partial] * num_copies
    assert len({tuple(s.block_table) for s in group.seqs}) == 3
    run_until_done(scheduler, model)
    assert len({tuple(s.output_token_ids) for s in group.seqs}) == 3
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_a_first_sequence_reserves_room_for_its_siblings():
    scheduler = make_scheduler(max_num_seqs=4)
    add(scheduler, "a", [1, 2, 3], n=3, max_tokens=2)
    add(scheduler, "b", [4, 5, 6], n=3, max_tokens=2)
    model = FakeModel(scheduler)
    output, _ = step(scheduler, model)
    assert [e.seq.request_id for e in output.scheduled] == ["a"]
    run_until_done(scheduler, model)


def test_best_of_returns_the_most_likely_sequences():
    scheduler = make_scheduler()
    group = add(scheduler, "b", [1, 2, 3], n=2, best_of=4, max_tokens=3)
    model = FakeModel(scheduler)
    while scheduler.has_unfinished_requests():
        _, received = step(scheduler, model)
        for seq in received:  # the engine keeps logprobs: here a made-up one per token
            seq.cumulative_logprob -= seq.last_token_id / VOCAB
    assert len(group.seqs) == 4
    best = group.select_outputs()
    assert best == sorted(group.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:2]


def test_prompt_longer_than_max_model_len_is_rejected():
    scheduler = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len=16"):
        add(scheduler, "too long", list(range(17)))
    add(scheduler, "fits", list(range(16)))


@pytest.mark.parametrize("prompt_len", [10, 16])
def test_generation_stops_at_max_model_len(prompt_len):
    scheduler = make_scheduler(max_model_len=16)
    seq = add(scheduler, "r", list(range(prompt_len)), max_tokens=None, ignore_eos=True).seqs[0]
    run_until_done(scheduler, FakeModel(scheduler))
    assert seq.finish_reason == "length"
    assert seq.num_output_tokens == max(16 - prompt_len, 1)


def test_cache_too_small_for_max_model_len_names_one_that_fits():
    with pytest.raises(ValueError, match="max_model_len=100.*set max_model_len to 64 or less"):
        verify_kv_cache_fits(max_model_len=100, num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="max_model_len to 64 or less"):
        make_scheduler(num_blocks=16, block_size=4, max_model_len=65)
    verify_kv_cache_fits(max_model_len=64, num_blocks=4, block_size=16)


@pytest.mark.parametrize("eos", [7, 8])
def test_any_eos_stops_with_no_stop_reason(eos):
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2], eos_token_ids=(7, 8)).seqs[0]
    scripted_step(scheduler, 3)
    scripted_step(scheduler, eos)
    assert (seq.output_token_ids, seq.finish_reason, seq.stop_reason) == ([3, eos], "stop", None)
    assert not scheduler.has_unfinished_requests()


def test_ignore_eos_runs_to_max_tokens():
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2], eos_token_ids=(7,), ignore_eos=True, max_tokens=3).seqs[0]
    for _ in range(3):
        scripted_step(scheduler, 7)
    assert (seq.output_token_ids, seq.finish_reason) == ([7, 7, 7], "length")


def test_stop_token_id_is_the_stop_reason():
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2], stop_token_ids=[5, 6]).seqs[0]
    scripted_step(scheduler, 6)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", 6)


def test_min_tokens_holds_back_eos_and_stop_tokens():
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2], eos_token_ids=(7,), stop_token_ids=[5], min_tokens=3).seqs[0]
    for token_id in (7, 5):
        scripted_step(scheduler, token_id)
    assert not seq.is_finished
    scripted_step(scheduler, 5)
    assert (seq.output_token_ids, seq.finish_reason, seq.stop_reason) == ([7, 5, 5], "stop", 5)


def test_engine_finishes_on_a_stop_string():
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2, 3, 4, 5], max_tokens=50).seqs[0]
    scripted_step(scheduler, 9)
    scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop_reason="###")
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "###")
    assert seq.block_table == [] and not scheduler.running and not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_a_stop_string_in_the_last_token_overrides_length():
    scheduler = make_scheduler()
    seq = add(scheduler, "r", [1, 2], max_tokens=1).seqs[0]
    scripted_step(scheduler, 9)
    assert seq.finish_reason == "length"
    scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop_reason="9")
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "9")
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_abort_frees_running_and_waiting_requests():
    scheduler = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    running = add(scheduler, "running", list(range(6)), n=1, max_tokens=50)
    waiting = add(scheduler, "waiting", list(range(6)), max_tokens=50)
    output = scheduler.schedule()
    assert [e.seq.request_id for e in output.scheduled] == ["running"]
    assert scheduler.abort_request("running") is running
    # Tokens sampled for a sequence aborted mid-step are dropped.
    assert scheduler.update(output, [[1]]) == []
    assert scheduler.abort_request("waiting") is waiting
    assert scheduler.abort_request("waiting") is None and scheduler.abort_request("unknown") is None
    assert all(s.finish_reason == "abort" for g in (running, waiting) for s in g.seqs)
    assert not scheduler.running and not scheduler.waiting and not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


@pytest.mark.parametrize("overrides, message", [
    (dict(preemption_mode="swapping"), "preemption_mode"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=4, max_num_seqs=8), "max_num_batched_tokens"),
])
def test_bad_configuration_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(**overrides)


def test_bad_requests_are_rejected():
    scheduler = make_scheduler(max_num_seqs=2)
    add(scheduler, "r", [1])
    with pytest.raises(ValueError, match="already in use"):
        add(scheduler, "r", [1])
    with pytest.raises(ValueError, match="at least one token"):
        add(scheduler, "empty", [])
    with pytest.raises(ValueError, match="max_num_seqs=2"):
        add(scheduler, "wide", [1], n=3)


def test_update_checks_the_sampled_tokens():
    scheduler = make_scheduler()
    add(scheduler, "r", [1, 2])
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="num_samples"):
        scheduler.update(output, [[1, 2]])


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("seed", range(4))
def test_randomized_stress_never_loses_a_request(seed, preemption_mode):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=rng.choice([6, 12, 40]),
                               max_num_seqs=rng.choice([3, 6]), max_model_len=40,
                               enable_prefix_caching=seed % 2 == 0, preemption_mode=preemption_mode,
                               num_cpu_blocks=rng.choice([3, 8]) if preemption_mode == "swap" else 0)
    model = FakeModel(scheduler)
    pending = make_workload(rng, num_requests=40)
    groups: list[SequenceGroup] = []
    aborted: set[str] = set()
    for _ in range(3000):
        if pending and rng.random() < 0.4:
            request_id, prompt, params = pending.pop()
            groups.append(add(scheduler, request_id, prompt, eos_token_ids=(0,), **params))
        if scheduler.requests and rng.random() < 0.05:
            request_id = rng.choice(sorted(scheduler.requests))
            scheduler.abort_request(request_id)
            aborted.add(request_id)
        _, received = step(scheduler, model)
        for seq in received:  # the engine's stop strings
            if not seq.is_finished and rng.random() < 0.02:
                scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop_reason="stop")
        if not pending and not scheduler.has_unfinished_requests():
            break
    assert not pending and not scheduler.has_unfinished_requests(), "a request never finished"
    assert len(groups) == 40
    for group in groups:
        assert group.is_finished
        reasons = {seq.finish_reason for seq in group.seqs}
        assert "abort" not in reasons or group.request_id in aborted
        if group.request_id not in aborted:
            assert len(group.seqs) == group.sampling_params.n
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert scheduler.block_manager.num_free_cpu_blocks == scheduler.block_manager.num_cpu_blocks
    assert not scheduler.running and not scheduler.waiting and not scheduler.swapped
    assert (scheduler.num_swap_outs > 0) == (preemption_mode == "swap")
