"""Weight loading: file layouts, tied embeddings, dummy weights, and the errors that name a tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedinfer.config import ModelConfig
from pagedinfer.models.loader import checkpoint_files, load_model


def load_cpu(folder: Path, load_format: str = "auto") -> torch.nn.Module:
    return load_model(ModelConfig.from_pretrained(folder, device="cpu"), "cpu", load_format)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_other_layouts_load_the_same_weights(checkpoint, fmt: str) -> None:
    folder = checkpoint("gqa2", fmt)
    if fmt == "sharded":
        assert (folder / "model.safetensors.index.json").exists()
        assert len(checkpoint_files(folder)) > 1
    else:
        assert [f.name for f in checkpoint_files(folder)] == ["pytorch_model.bin"]
    assert_same_weights(load_cpu(folder), load_cpu(checkpoint("gqa2")))


def test_safetensors_preferred_over_bin(checkpoint, tmp_path: Path) -> None:
    shutil.copytree(checkpoint("gqa2"), tmp_path, dirs_exist_ok=True)
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert [f.name for f in checkpoint_files(tmp_path)] == ["model.safetensors"]
    assert [f.name for f in checkpoint_files(tmp_path, "pt")] == ["pytorch_model.bin"]


def test_no_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no safetensors or pt weights"):
        checkpoint_files(tmp_path)


def test_tied_lm_head_is_the_embedding(checkpoint) -> None:
    model = load_cpu(checkpoint("tied"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(checkpoint("tied") / "model.safetensors")


def rewritten_checkpoint(source: Path, folder: Path, edit) -> Path:
    """A copy of a single-file checkpoint whose tensors dict went through `edit`."""
    shutil.copy(source / "config.json", folder / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_tied_checkpoint_with_an_lm_head_copy_loads(checkpoint, tmp_path: Path) -> None:
    def add_copy(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    assert_same_weights(load_cpu(rewritten_checkpoint(checkpoint("tied"), tmp_path, add_copy)),
                        load_cpu(checkpoint("tied")))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     r"lacks 1 tensor\(s\): model.layers.1.self_attn.k_proj.weight"),
    (lambda t: t.pop("lm_head.weight"), r"lacks 1 tensor\(s\): lm_head.weight"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 63)}),
     r"'model.layers.0.mlp.up_proj.weight': shape mismatch: the model expects \(128, 64\), "
     r"the checkpoint has \(128, 63\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(65)}), r"'model.norm.weight': shape mismatch"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.zeros(16)}),
     r"has tensor 'model.layers.0.self_attn.q_norm.weight', which the model does not use"),
])
def test_checkpoint_errors_name_the_tensor(checkpoint, tmp_path: Path, edit, message: str) -> None:
    folder = rewritten_checkpoint(checkpoint("gqa2"), tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_cpu(folder)


def test_dummy_weights_are_deterministic_and_sane(checkpoint) -> None:
    config = ModelConfig.from_pretrained(checkpoint("gqa2"), device="cpu")
    a, b = load_model(config, "cpu", "dummy", seed=1), load_model(config, "cpu", "dummy", seed=1)
    assert_same_weights(a, b)
    c = load_model(config, "cpu", "dummy", seed=2)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    assert 0.015 < a.lm_head.weight.std().item() < 0.025


def test_dummy_needs_only_a_config() -> None:
    config = json.loads((Path(__file__).parent / "data" / "llama31_hf4_config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model_config = ModelConfig.from_hf_config(config, device="cpu")
    model = load_model(model_config, "cpu", "dummy")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_unknown_architecture_and_format(checkpoint) -> None:
    config = ModelConfig.from_pretrained(checkpoint("gqa2"), device="cpu")
    with pytest.raises(ValueError, match="unknown load_format 'npz'"):
        load_model(config, "cpu", "npz")
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"):
        load_model(ModelConfig.from_hf_config({**json.loads((checkpoint("gqa2") / "config.json").read_text()),
                                               "architectures": ["GPT2LMHeadModel"]}, device="cpu"), "cpu")
