"""KV-cache sizing by profiling. On the CPU: the profiled step's shape, the budget arithmetic, its log
line and its error. On CUDA (`gpu`): a profiled engine under a hard cap on this process's memory (just
what gpu_memory_utilization allows it) serves a burst of long prompts, with prompt logprobs over a
32k vocabulary, without running out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pagedinfer import LLM, SamplingParams
from pagedinfer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pagedinfer.worker.cache_engine import kv_block_bytes
from pagedinfer.models.loader import load_model
from pagedinfer.worker.memory_profiler import (MemoryProfile, graph_pool_reserve_bytes, kv_cache_bytes,
                                               num_gpu_kv_blocks, profile_sequence_lengths, run_largest_step)

_GIB = 1 << 30


@pytest.mark.parametrize("tokens, max_model_len, max_num_seqs, expected", [
    (8192, 131072, 256, [8192]),             # one long prompt
    (8192, 2048, 256, [2048] * 4),
    (10, 4, 256, [4, 3, 3]),                 # as equal as can be
    (8192, 128, 8, [128] * 8),               # no more than max_num_seqs sequences fit in a step
    (7, 100, 3, [7]),
])
def test_profile_sequence_lengths(tokens: int, max_model_len: int, max_num_seqs: int,
                                  expected: list[int]) -> None:
    assert profile_sequence_lengths(tokens, max_model_len, max_num_seqs) == expected


def test_profile_sequence_lengths_refuses_nonpositive_sizes() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        profile_sequence_lengths(10, 0, 4)


def _config(tmp_path: Path, utilization: float = 0.9, **model_overrides) -> EngineConfig:
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
              dtype="bfloat16") | model_overrides
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return EngineConfig(model=ModelConfig.from_pretrained(tmp_path, device="cpu"),
                        cache=CacheConfig(gpu_memory_utilization=utilization), scheduler=SchedulerConfig(),
                        device=torch.device("cpu"), tokenizer=None)


def test_budget_is_utilization_less_what_is_used() -> None:
    profile = MemoryProfile(total_bytes=80 * _GIB, in_use_bytes=16 * _GIB, weights_bytes=15 * _GIB,
                            activation_peak_bytes=3 * _GIB)
    assert kv_cache_bytes(profile, 0.9, graph_reserve_bytes=_GIB) == int(0.9 * 80 * _GIB) - 20 * _GIB
    assert kv_cache_bytes(profile, 0.2, graph_reserve_bytes=0) < 0


def test_block_count_and_its_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Llama-3.1-8B's shapes on an 80 GiB card: 128 KiB a token of KV (bf16), so 2 MiB a block of 16."""
    config = _config(tmp_path)
    block_bytes = kv_block_bytes(config.model, 16)
    assert block_bytes == 2 << 20
    profile = MemoryProfile(total_bytes=80 * _GIB, in_use_bytes=16 * _GIB, weights_bytes=15 * _GIB,
                            activation_peak_bytes=3 * _GIB)
    caplog.set_level(logging.INFO, logger="pagedinfer.worker.memory_profiler")
    num_blocks = num_gpu_kv_blocks(profile, config, graph_reserve_bytes=_GIB)
    assert num_blocks == (int(0.9 * 80 * _GIB) - 20 * _GIB) // block_bytes
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"KV cache: {num_blocks} blocks of 16 tokens")
    for part in ("weights 15.00 GiB", "activation peak 3.00 GiB", "CUDA graph reserve 1.00 GiB",
                 "other in use (CUDA context, buffers, other processes) 1.00 GiB",
                 f"maximum concurrency at max_model_len 8192: {num_blocks * 16 / 8192:.2f}x"):
        assert part in message


def test_no_room_for_one_block_names_the_knobs(tmp_path: Path) -> None:
    config = _config(tmp_path, utilization=0.2)
    profile = MemoryProfile(total_bytes=80 * _GIB, in_use_bytes=16 * _GIB, weights_bytes=15 * _GIB,
                            activation_peak_bytes=3 * _GIB)
    with pytest.raises(ValueError, match="raise gpu_memory_utilization.*max_num_batched_tokens"):
        num_gpu_kv_blocks(profile, config, graph_reserve_bytes=0)


def test_graph_reserve_grows_with_the_batch(tmp_path: Path) -> None:
    model = _config(tmp_path).model
    small, large = graph_pool_reserve_bytes(model, 8), graph_pool_reserve_bytes(model, 256)
    assert 256 << 20 < small < large < 2 * _GIB


def test_the_profiled_step_runs(tiny_model: Path) -> None:
    """On the CPU too: 300 tokens in three prompts of 100 (max_model_len 128), then 8 sampled rows."""
    config = EngineConfig.create(str(tiny_model), device="cpu", dtype="float32", max_num_batched_tokens=300,
                                 max_model_len=128, max_num_seqs=8, block_size=4)
    model = load_model(config.model, "cpu")
    assert run_largest_step(model, config, workspace=None) == (300, 8)


# ---- on CUDA ---------------------------------------------------------------------------------------

@pytest.fixture
def dummy_32k_vocab_model(tmp_path: Path) -> Path:
    """A config alone (random weights): small layers, a 32k vocabulary, so that the logits dominate a
    step's memory."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        dtype="bfloat16")))
    return tmp_path


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_burst_stays_within_gpu_memory_utilization(dummy_32k_vocab_model: Path, enforce_eager: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """gpu_memory_utilization leaves 3 GiB beyond what the card already uses, and this process's
    allocator is capped at exactly that (an allocation beyond it raises out-of-memory). 32 prompts of
    1500 tokens, half asking for prompt logprobs ([8192, 32000] float32 logits would be 1 GiB, with
    log_softmax's temporaries several), complete."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    utilization = (total - free + 3 * _GIB) / total
    caplog.set_level(logging.INFO, logger="pagedinfer.worker")
    torch.cuda.set_per_process_memory_fraction((reserved + 3 * _GIB) / total)
    try:
        llm = LLM(model=str(dummy_32k_vocab_model), load_format="dummy", skip_tokenizer_init=True,
                  device="cuda", gpu_memory_utilization=utilization, max_num_seqs=32, max_model_len=2048,
                  enforce_eager=enforce_eager)
        runner = llm.llm_engine.model_runner
        assert runner.cache.num_blocks > 0
        assert any(r.getMessage().startswith(f"KV cache: {runner.cache.num_blocks} blocks")
                   for r in caplog.records)
        prompts = [{"prompt_token_ids": torch.randint(0, 32000, (1500,)).tolist()} for _ in range(32)]
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, max_tokens=16, ignore_eos=True,
                                 seed=i, prompt_logprobs=1 if i % 2 else None, logprobs=2) for i in range(32)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
        assert all(len(o.prompt_logprobs) == 1500 for o in outputs[1::2])
        assert (runner.num_graph_replays > 0) != enforce_eager
        if not enforce_eager:  # the graphs fit in what was set aside for them
            reserve = graph_pool_reserve_bytes(llm.llm_engine.config.model, 32)
            assert 0 < runner.decode_graphs.pool_bytes <= reserve
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_num_gpu_blocks_override_skips_profiling(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pagedinfer.worker.memory_profiler")
    llm = LLM(model=str(tiny_model), device="cuda", num_gpu_blocks_override=37, max_num_seqs=4, max_model_len=64)
    assert llm.llm_engine.model_runner.cache.num_blocks == 37
    assert not [r for r in caplog.records if "KV cache" in r.getMessage()]
