"""CUDA graphs of decode steps. On the CPU: the captured batch sizes, the padding, and the persistent
input buffers (a padded batch through them gives the eager rows and writes nothing else to the cache).
On CUDA (`gpu`): the engine with graphs against the eager engine (tokens, logprobs) and HF, replays
counted against decode steps, batches between captured sizes and shrinking as requests finish,
preemption, split-KV decode inside a graph, and enforce_eager."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

from pagedinfer import LLM, SamplingParams
from pagedinfer.attention import AttentionMetadata
from pagedinfer.config import ModelConfig
from pagedinfer.models.loader import load_model
from pagedinfer.worker.cuda_graphs import (DecodeGraphs, DecodeInputBuffers, capture_batch_sizes, decode_slot,
                                           padded_batch_size)
from tests.engine.utils import BOS, EOS, hf_greedy
from tests.models.utils import load_hf, make_hf_model, save_checkpoint


# ---- batch sizes and padding (CPU) -----------------------------------------------------------------

@pytest.mark.parametrize("max_num_seqs, expected", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (40, [1, 2, 4, 8, 16, 24, 32, 40]),
])
def test_capture_batch_sizes(max_num_seqs: int, expected: list[int]) -> None:
    assert capture_batch_sizes(max_num_seqs) == expected


def test_capture_batch_sizes_of_the_default_max_num_seqs() -> None:
    sizes = capture_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))


def test_capture_stops_at_512() -> None:
    sizes = capture_batch_sizes(1000)
    assert sizes[-1] == 512 and len(sizes) == 67


def test_capture_batch_sizes_refuses_no_sequences() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_batch_sizes(0)


@pytest.mark.parametrize("num_seqs, expected", [(1, 1), (3, 4), (4, 4), (5, 8), (17, 24), (24, 24),
                                                (0, None), (25, None)])
def test_padded_batch_size(num_seqs: int, expected: Optional[int]) -> None:
    assert padded_batch_size(num_seqs, [1, 2, 4, 8, 16, 24]) == expected


def test_decode_slot_is_the_last_tokens() -> None:
    # Position 9 (the 10th token) of a sequence with blocks [7, 3, 5] of 4: block 5 (the third), offset 1.
    assert decode_slot(10, [7, 3, 5], 4) == 5 * 4 + 1
    assert decode_slot(1, [6], 4) == 24
    # The slot AttentionMetadata.build gives the same token.
    metadata = AttentionMetadata.build([10], [1], [[7, 3, 5]], 4, "cpu")
    assert metadata.slot_mapping.tolist() == [21]


# ---- the persistent input buffers (CPU) ------------------------------------------------------------

def test_buffers_hold_the_step_then_harmless_padding() -> None:
    buffers = DecodeInputBuffers(max_num_seqs=8, max_blocks_per_seq=5, device=torch.device("cpu"))
    assert buffers.slot_mapping.tolist() == [-1] * 8  # warm-up and capture write nothing
    buffers.fill(input_ids=[11, 12, 13], positions=[4, 0, 8], slot_mapping=[20, 2, 35],
                 seq_lens=[5, 1, 9], block_tables=[[4, 5], [0], [1, 6, 8]], padded_size=4)
    assert buffers.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert buffers.positions[:4].tolist() == [4, 0, 8, 0]
    assert buffers.slot_mapping[:4].tolist() == [20, 2, 35, -1]
    assert buffers.seq_lens[:4].tolist() == [5, 1, 9, 0]
    tables = buffers.block_tables[:3, :3].tolist()
    assert (tables[0][:2], tables[1][:1], tables[2]) == ([4, 5], [0], [1, 6, 8])
    metadata = buffers.metadata(4, workspace=None)
    assert metadata.max_query_len == 1
    assert metadata.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert metadata.block_tables.shape == (4, 5) and metadata.slot_mapping.shape == (4,)
    # A smaller batch next: the rows it no longer uses become padding again.
    buffers.fill([21], [2], [9], [3], [[2]], padded_size=2)
    assert buffers.input_ids[:2].tolist() == [21, 0]
    assert buffers.slot_mapping[:2].tolist() == [9, -1]
    assert buffers.seq_lens[:2].tolist() == [3, 0]
    assert buffers.block_tables[0, 0].item() == 2
    assert buffers.input_ids.dtype == buffers.positions.dtype == buffers.slot_mapping.dtype == torch.int64
    assert buffers.seq_lens.dtype == buffers.block_tables.dtype == torch.int32


def test_buffers_refuse_bad_input() -> None:
    buffers = DecodeInputBuffers(max_num_seqs=4, max_blocks_per_seq=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="padded_size"):
        buffers.fill([1, 2, 3], [0, 0, 0], [0, 1, 2], [1, 1, 1], [[0], [0], [0]], padded_size=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        buffers.fill([1], [0], [0], [1], [[0]], padded_size=5)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        buffers.fill([1], [0], [0], [1], [[0, 1, 2]], padded_size=1)
    with pytest.raises(ValueError, match="block tables"):
        buffers.fill([1, 2], [0, 0], [0, 1], [1, 1], [[0]], padded_size=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        DecodeInputBuffers(max_num_seqs=0, max_blocks_per_seq=2, device=torch.device("cpu"))


@torch.inference_mode()
def test_padded_batch_through_the_buffers_gives_the_eager_rows(tiny_model: Path) -> None:
    """Three decodes padded to a batch of 8 (the model run on the buffers' views, as a graph is
    captured): the three rows are the eager batch's, and the cache differs only in their slots."""
    config = ModelConfig.from_pretrained(tiny_model, dtype="float32", device="cpu")
    model = load_model(config, "cpu")
    block_size, num_blocks = 4, 12
    caches = [torch.randn(2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
              for _ in range(config.num_hidden_layers)]
    seq_lens, tables = [6, 1, 11], [[3, 7], [0], [5, 9, 2]]
    input_ids, positions = [17, 42, 99], [n - 1 for n in seq_lens]
    slots = [decode_slot(n, t, block_size) for n, t in zip(seq_lens, tables)]

    eager_caches = [c.clone() for c in caches]
    eager = model(torch.tensor(input_ids), torch.tensor(positions), eager_caches,
                  AttentionMetadata.build(seq_lens, [1, 1, 1], tables, block_size, "cpu"))

    buffers = DecodeInputBuffers(max_num_seqs=8, max_blocks_per_seq=4, device=torch.device("cpu"))
    buffers.fill([5] * 8, [3] * 8, list(range(8)), [2] * 8, [[1]] * 8, padded_size=8)  # stale rows
    buffers.fill(input_ids, positions, slots, seq_lens, tables, padded_size=8)
    padded_caches = [c.clone() for c in caches]
    padded = model(buffers.input_ids[:8], buffers.positions[:8], padded_caches, buffers.metadata(8, None))

    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for before, after_eager, after_padded in zip(caches, eager_caches, padded_caches):
        torch.testing.assert_close(after_padded, after_eager, rtol=1e-5, atol=1e-5)
        changed = (after_padded != before).reshape(2, num_blocks * block_size, -1).any(-1).any(0)
        written = changed.nonzero().flatten().tolist()
        assert written == sorted(slots)


def test_graphs_need_cuda(tiny_model: Path) -> None:
    buffers = DecodeInputBuffers(max_num_seqs=2, max_blocks_per_seq=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(torch.nn.Identity(), [], buffers, None, [1, 2])


def test_cpu_engine_has_no_graphs(tiny_model: Path) -> None:
    llm = LLM(model=str(tiny_model), device="cpu", dtype="float32", num_gpu_blocks_override=64,
              block_size=4, max_model_len=64, max_num_seqs=4)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    runner = llm.llm_engine.model_runner
    assert runner.decode_graphs is None and runner.num_graph_replays == 0


# ---- the engine's decode path through the buffers (CPU) ----------------------------------------------

class UncapturedDecodeGraphs:
    """DecodeGraphs without the capture, for the CPU: a "replay" runs the model on the buffers' padded
    rows, as the graph would. Everything the engine does around a replay (filling the buffers,
    sampling from the padded hidden states) is then exercised without a GPU."""

    def __init__(self, runner) -> None:
        config = runner.config
        max_blocks = -(-config.model.max_model_len // config.cache.block_size)
        self.buffers = DecodeInputBuffers(config.scheduler.max_num_seqs, max_blocks, runner.device)
        self.sizes = capture_batch_sizes(config.scheduler.max_num_seqs)
        self.num_replays = 0
        self._runner = runner

    def padded_size(self, num_seqs: int) -> Optional[int]:
        return padded_batch_size(num_seqs, self.sizes)

    def replay(self, padded_size: int) -> torch.Tensor:
        self.num_replays += 1
        b, runner = self.buffers, self._runner
        return runner.model(b.input_ids[:padded_size], b.positions[:padded_size], runner.cache.kv_caches,
                            b.metadata(padded_size, runner.workspace))


def _cpu_llm_with_buffers(folder: Path, **overrides) -> LLM:
    options = dict(dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=512, max_num_seqs=24,
                   max_model_len=128)
    llm = LLM(model=str(folder), **(options | overrides))
    runner = llm.llm_engine.model_runner
    runner.decode_graphs = UncapturedDecodeGraphs(runner)
    return llm


def test_decode_steps_through_the_buffers_match_hf(tiny_model: Path) -> None:
    """17 requests of different lengths: the batch shrinks through sizes between the captured ones."""
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in [3, 9, 2, 14, 5, 7, 11, 4, 6, 13, 8, 10, 3, 12,
                                                               5, 9, 6]]
    lengths = [4, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 9, 9, 12, 12, 20]
    llm = _cpu_llm_with_buffers(tiny_model)
    log = StepLog(llm)
    outputs = _generate(llm, prompts, [_greedy(n) for n in lengths])
    assert llm.llm_engine.model_runner.num_graph_replays == log.decode_steps > 0
    assert {17: 24, 5: 8, 3: 4}.items() <= dict(log.replayed).items()
    hf = load_hf(tiny_model, "cpu")
    for prompt, output, n in zip(prompts, outputs, lengths):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, n)


def _check_preempted_decodes_match_hf(llm, model: Path, hf_device: str):
    """Four 12-token prompts growing by 20 greedy tokens in the LLM's small pool: some are preempted, and
    every decode step replays a graph (or fills its buffers); tokens match HF's. Returns (prompts, HF model)."""
    log = StepLog(llm)
    prompts = [torch.randint(2, 320, (12,)).tolist() for _ in range(4)]
    outputs = _generate(llm, prompts, _greedy(20))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.model_runner.num_graph_replays == log.decode_steps > 0
    hf = load_hf(model, hf_device)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
    return prompts, hf


def test_preemption_and_forks_through_the_buffers_match_hf(tiny_model: Path) -> None:
    """A 16-block pool: sequences are preempted and come back into decode batches; n=2 siblings share
    a prompt's blocks (copy-on-write of the partial one)."""
    llm = _cpu_llm_with_buffers(tiny_model, num_gpu_blocks_override=16, max_model_len=64, max_num_seqs=8)
    prompts, hf = _check_preempted_decodes_match_hf(llm, tiny_model, "cpu")
    (forked,) = _generate(llm, prompts[:1], _greedy(6, n=2))
    assert [c.token_ids for c in forked.outputs] == [hf_greedy(hf, prompts[0], 6)] * 2


# ---- the engine on CUDA ----------------------------------------------------------------------------

def _llm(folder: Path, dtype: str = "float32", **overrides) -> LLM:
    options = dict(dtype=dtype, device="cuda", block_size=4, num_gpu_blocks_override=512, max_num_seqs=24,
                   max_model_len=128)
    return LLM(model=str(folder), **(options | overrides))


class StepLog:
    """Wraps the model runner: how many steps were decode steps, and the batch sizes replayed."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.llm_engine.model_runner
        self.decode_steps = 0
        self.replayed: list[tuple[int, int]] = []  # (sequences, captured batch size)
        execute = runner.execute

        def counting_execute(step):
            num_seqs = len(step.scheduled)
            if all(entry.num_new_tokens == 1 for entry in step.scheduled):
                self.decode_steps += 1
            before = runner.num_graph_replays
            result = execute(step)
            if runner.num_graph_replays > before:
                self.replayed.append((num_seqs, runner.decode_graphs.padded_size(num_seqs)))
            return result

        runner.execute = counting_execute


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _assert_same_greedy_run(graphs, eager, exact: bool, tolerance: tuple[float, float]) -> None:
    """Tokens and the logprobs of the top 3 at each position. `exact`: every token equal. Otherwise
    (bf16, where a padded GEMM may round differently) the runs may part where two tokens are nearly
    tied: each run's token is then among the other's top 3 and comparison stops there."""
    for ours, theirs in zip(graphs, eager, strict=True):
        a, b = ours.outputs[0], theirs.outputs[0]
        for position, (token_a, token_b) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            logprobs_a, logprobs_b = a.logprobs[position], b.logprobs[position]
            if token_a != token_b:
                assert not exact, f"position {position}: {token_a} with graphs, {token_b} eager"
                assert token_a in logprobs_b and token_b in logprobs_a
                break
            for token in set(logprobs_a) & set(logprobs_b):
                rel, abs_ = tolerance
                assert logprobs_a[token].logprob == pytest.approx(logprobs_b[token].logprob, rel=rel, abs=abs_)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, exact, tolerance", [("float32", True, (1e-4, 1e-4)),
                                                     ("bfloat16", False, (0.02, 0.25))])
def test_graphs_match_eager_and_replay_every_decode_step(tiny_model: Path, dtype: str, exact: bool,
                                                         tolerance: tuple[float, float]) -> None:
    """17 requests finishing at different lengths: the batch shrinks through sizes between the
    captured ones (17 -> 24, 5 -> 8, 3 -> 4). Every decode step replays a graph."""
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in [3, 9, 2, 14, 5, 7, 11, 4, 6, 13, 8, 10, 3, 12,
                                                               5, 9, 6]]
    lengths = [4, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 9, 9, 12, 12, 20]  # 17 -> 15 -> 5 (not captured) ...
    params = [_greedy(n, logprobs=3) for n in lengths]
    llm = _llm(tiny_model, dtype)
    log = StepLog(llm)
    graphs = _generate(llm, prompts, params)
    runner = llm.llm_engine.model_runner
    assert runner.decode_graphs.sizes == [1, 2, 4, 8, 16, 24]
    assert runner.num_graph_replays == log.decode_steps > 0
    assert len(log.replayed) == log.decode_steps
    replayed_sizes = {num_seqs: padded for num_seqs, padded in log.replayed}
    assert {17: 24, 5: 8, 3: 4}.items() <= replayed_sizes.items()
    eager_llm = _llm(tiny_model, dtype, enforce_eager=True)
    eager = _generate(eager_llm, prompts, params)
    assert eager_llm.llm_engine.model_runner.num_graph_replays == 0
    assert eager_llm.llm_engine.model_runner.decode_graphs is None
    assert [len(o.outputs[0].token_ids) for o in graphs] == lengths
    _assert_same_greedy_run(graphs, eager, exact, tolerance)
    if dtype == "float32":
        hf = load_hf(tiny_model, "cuda")
        for prompt, output, n in zip(prompts[:3], graphs, lengths):
            assert output.outputs[0].token_ids == hf_greedy(hf, prompt, n)


@pytest.mark.gpu
def test_seeded_sampling_with_graphs_equals_eager(tiny_model: Path) -> None:
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in [4, 7, 2, 9, 5]]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=10 + i, max_tokens=12, ignore_eos=True)
              for i in range(5)]
    graphs = _llm(tiny_model)
    tokens = [o.outputs[0].token_ids for o in _generate(graphs, prompts, params)]
    assert graphs.llm_engine.model_runner.num_graph_replays > 0
    eager = [o.outputs[0].token_ids for o in _generate(_llm(tiny_model, enforce_eager=True), prompts, params)]
    assert tokens == eager


@pytest.mark.gpu
def test_graphs_under_preemption_match_hf(tiny_model: Path) -> None:
    """16 blocks of 4 tokens for four sequences growing to 32 tokens: preempted and recomputed
    sequences go back into graph batches."""
    llm = _llm(tiny_model, num_gpu_blocks_override=16, max_model_len=64, max_num_seqs=8)
    _check_preempted_decodes_match_hf(llm, tiny_model, "cuda")


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """The tiny model with a 4096-token context: a decode graph captured for max_model_len 4096 splits
    each row's keys over several CTAs (split-KV), whatever the current lengths."""
    folder = tmp_path_factory.mktemp("tiny-llama-4k")
    tiny_tokenizer.save_pretrained(folder)
    model = make_hf_model(dict(vocab_size=len(tiny_tokenizer), bos_token_id=BOS, eos_token_id=EOS,
                               pad_token_id=None, max_position_embeddings=4096))
    return save_checkpoint(model, folder)


@pytest.mark.gpu
def test_split_kv_decode_inside_graphs_matches_hf(long_context_model: Path) -> None:
    llm = _llm(long_context_model, block_size=16, max_model_len=4096, num_gpu_blocks_override=256,
               max_num_seqs=4)
    log = StepLog(llm)
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in [300, 41, 7]]
    outputs = _generate(llm, prompts, _greedy(8))
    assert llm.llm_engine.model_runner.num_graph_replays == log.decode_steps > 0
    hf = load_hf(long_context_model, "cuda")
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 8)


@pytest.mark.gpu
def test_capture_is_logged_and_quick(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pagedinfer.worker.cuda_graphs")
    llm = _llm(tiny_model, max_num_seqs=256, num_gpu_blocks_override=1024)
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert len(graphs.sizes) == 35
    (record,) = [r for r in caplog.records if "captured CUDA graphs" in r.getMessage()]
    seconds = float(record.getMessage().split(" in ")[1].split(" s")[0])
    assert seconds < 30
    assert graphs.pool_bytes > 0
