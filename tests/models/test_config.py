"""ModelConfig from the config.json variants found in the wild, dtype and device resolution, and the
engine's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, PretrainedConfig, Qwen2Config

from pagedinfer.config import (CacheConfig, EngineConfig, Llama3RopeScaling, ModelConfig,
                               resolve_device, resolve_dtype)

DATA = Path(__file__).parent / "data"


def hf_config(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_llama31_written_by_transformers4(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama31_hf4_config.json")))
    # The chat model's stop tokens are in generation_config.json, not config.json.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    config = ModelConfig.from_pretrained(tmp_path, device="cuda", max_model_len=8192)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (4096, 14336, 32)
    assert (config.num_key_value_heads, config.head_dim, config.num_hidden_layers) == (8, 128, 32)
    assert (config.rope_theta, config.rms_norm_eps, config.dtype) == (500000.0, 1e-5, torch.bfloat16)
    assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (config.max_position_embeddings, config.max_model_len) == (131072, 8192)
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert not config.tie_word_embeddings


def test_smollm2_written_by_transformers4(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config("smollm2_hf4_config.json")))
    config = ModelConfig.from_pretrained(tmp_path, device="cpu")
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (64, 3, 100000)
    assert config.rope_scaling is None and config.tie_word_embeddings
    assert config.eos_token_ids == (2,) and config.max_model_len == 8192


def test_written_by_transformers5(checkpoint) -> None:
    # transformers 5 writes "rope_parameters" (theta and scaling together) and "dtype".
    raw = json.loads((checkpoint("llama3_rope") / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw
    config = ModelConfig.from_pretrained(checkpoint("llama3_rope"), device="cpu")
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    assert config.dtype == torch.float32


def test_old_config_quirks() -> None:
    raw = hf_config("smollm2_hf4_config.json")
    del raw["num_key_value_heads"], raw["torch_dtype"]
    raw["rope_scaling"] = {"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 2.0, "original_max_position_embeddings": 1024}
    config = ModelConfig.from_hf_config(raw, device="cpu")
    assert config.num_key_value_heads == 9  # no GQA
    assert config.rope_scaling == Llama3RopeScaling(2.0, 1.0, 2.0, 1024)
    assert config.dtype == torch.float32


def test_qwen25_written_by_transformers4() -> None:
    config = ModelConfig.from_hf_config(hf_config("qwen25_hf4_config.json"), device="cpu")
    # Qwen2's biases are in its code, not its config: q/k/v have one, o_proj none.
    assert config.qkv_bias and not config.o_proj_bias and not config.mlp_bias
    # sliding_window is set, but use_sliding_window is false.
    assert config.layer_sliding_windows == (-1,) * 24
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (64, 2, 1000000.0)


def test_llama_has_no_window_nor_qkv_bias() -> None:
    config = ModelConfig.from_hf_config(hf_config("llama31_hf4_config.json"), device="cpu")
    assert not (config.qkv_bias or config.o_proj_bias)
    assert config.layer_sliding_windows == (-1,) * 32
    # HF's Llama has no sliding window: a stray key in its config changes nothing.
    stray = ModelConfig.from_hf_config({**hf_config("llama31_hf4_config.json"), "sliding_window": 8}, device="cpu")
    assert stray.layer_sliding_windows == (-1,) * 32


def test_layer_types_must_name_every_layer() -> None:
    raw = {**hf_config("qwen25_hf4_config.json"), "use_sliding_window": True,
           "layer_types": ["sliding_attention"] * 3}
    with pytest.raises(ValueError, match="3 sliding windows for 24 layers"):
        ModelConfig.from_hf_config(raw)


def hf_layer_windows(config: PretrainedConfig) -> tuple[int, ...]:
    """Each layer's window as transformers' modeling code picks it (Mistral's applies to every layer,
    Qwen2's to the layers layer_types calls sliding)."""
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return tuple(config.sliding_window if kind == "sliding_attention" and config.sliding_window else -1
                 for kind in layer_types)


@pytest.mark.parametrize("config_class, change", [
    (MistralConfig, dict(sliding_window=4096)),  # Mistral 7B v0.1
    (MistralConfig, dict(sliding_window=None)),  # v0.2 on
    (Qwen2Config, dict(use_sliding_window=False, sliding_window=4096, max_window_layers=2)),
    (Qwen2Config, dict(use_sliding_window=True, sliding_window=4096, max_window_layers=2)),
    (Qwen2Config, dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0)),
    (Qwen2Config, dict(sliding_window=4096, max_window_layers=2)),  # off by default
    (Qwen2Config, dict(use_sliding_window=True, sliding_window=4096,
                       layer_types=["sliding_attention", "full_attention"] * 2)),
])
def test_sliding_windows_as_transformers_decides(config_class: type[PretrainedConfig], change: dict) -> None:
    hf = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, **change)
    raw = {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")], **hf}
    assert (ModelConfig.from_hf_config(raw, device="cpu").layer_sliding_windows
            == hf_layer_windows(config_class(**hf)))


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"architectures": []}, "names no architecture"),
    ({"num_key_value_heads": 4}, "not a multiple of num_key_value_heads 4"),
])
def test_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**hf_config("smollm2_hf4_config.json"), **change})


def test_max_model_len_cannot_exceed_the_positions() -> None:
    with pytest.raises(ValueError, match="max_model_len 9000 must be in"):
        ModelConfig.from_hf_config(hf_config("smollm2_hf4_config.json"), max_model_len=9000)


@pytest.mark.parametrize("requested, checkpoint_dtype, device, expected", [
    ("auto", "bfloat16", "cuda", torch.bfloat16),
    ("auto", "float16", "cuda", torch.float16),
    ("auto", "bfloat16", "cpu", torch.bfloat16),
    ("auto", "float16", "cpu", torch.float32),  # CPU half is slow and overflows
    ("auto", None, "cuda", torch.float32),
    ("half", "bfloat16", "cuda", torch.float16),
    ("float32", "bfloat16", "cpu", torch.float32),
    (torch.bfloat16, "float16", "cpu", torch.bfloat16),
])
def test_resolve_dtype(requested, checkpoint_dtype, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(requested, checkpoint_dtype, device) == expected


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", None, "cpu")


def test_cache_config_validates() -> None:
    assert CacheConfig().block_size == 16
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)


def test_engine_config_resolves_defaults(checkpoint) -> None:
    folder = str(checkpoint("gqa2"))
    config = EngineConfig.create(folder, device="cpu")
    assert (config.device, config.tokenizer, config.model.max_model_len) == (torch.device("cpu"), folder, 256)
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (256, 4096)
    assert config.cache.num_gpu_blocks is None and config.scheduler.enable_prefix_caching
    # The budget never drops below one decode token per running sequence.
    many = EngineConfig.create(folder, device="cpu", max_num_seqs=5000)
    assert many.scheduler.max_num_batched_tokens == 5000
    assert EngineConfig.create(folder, device="cpu", skip_tokenizer_init=True).tokenizer is None
    with pytest.raises(ValueError, match="model='org/not-a-local-folder' is neither a local"):
        EngineConfig.create("org/not-a-local-folder")
    with pytest.raises(ValueError, match="tokenizer='org/no-tokenizer' is neither a local"):
        EngineConfig.create(folder, tokenizer="org/no-tokenizer")


def test_resolve_device() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'cpu'"):
        resolve_device("mps")
