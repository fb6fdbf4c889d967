"""Tiny random checkpoints of the Llama-like families in HF format, and a minimal paged driver of our
model.

The driver does what the engine's model runner does, and nothing more: it owns a KV cache pool,
gives each sequence blocks from a random permutation of it, and feeds each step's new tokens with
their positions and attention metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM as HFLlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PreTrainedModel, Qwen2Config,
                          Qwen2ForCausalLM)

from pagedinfer.attention import AttentionMetadata
from pagedinfer.config import ModelConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)

# family -> its HF config and model classes.
FAMILIES = {
    "llama": (LlamaConfig, HFLlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

# name -> config overrides of TINY; "family" picks the HF classes (default Llama), "config_json" holds
# entries written over the saved config.json (see save_checkpoint).
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa2": {},
    # GQA groups of 3, and a head_dim that is not hidden / heads (q_size 144 != hidden 96).
    "gqa3_head_dim": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=24),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "tied": dict(tie_word_embeddings=True),
    # The tests' prompts and chunks run past the window.
    "mistral_window8": dict(family="mistral", sliding_window=8),
    # As Qwen2 checkpoints in the wild are: a sliding_window that use_sliding_window=false turns off,
    # and no layer_types (Qwen2Config would drop the window and write layer_types).
    "qwen2_window_off": dict(family="qwen2", use_sliding_window=False, max_window_layers=0,
                             config_json=dict(sliding_window=8, layer_types=None)),
    # Layer 0 attends to everything, layer 1 through a window of 5.
    "qwen2_window_from_layer1": dict(family="qwen2", use_sliding_window=True, sliding_window=5,
                                     max_window_layers=1),
}


def make_hf_model(overrides: dict, seed: int = 0) -> PreTrainedModel:
    """A float32 HF model with weights large enough that attention is far from uniform and the norm
    weights and biases are not ones and zeros (so that a wrong position, head or weight shows in the
    logits)."""
    config_overrides = {k: v for k, v in overrides.items() if k not in ("family", "config_json")}
    config_class, model_class = FAMILIES[overrides.get("family", "llama")]
    model = model_class(config_class(**{**TINY, **config_overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.25 * noise)
    return model.eval()


def save_checkpoint(model: PreTrainedModel, folder: Path, fmt: str = "safetensors",
                    config_json: dict[str, Any] | None = None) -> Path:
    """fmt: "safetensors" (one file), "sharded" (several files and an index), or "bin" (a pickled
    state dict, as old checkpoints are). config_json: entries written over the saved config.json."""
    if fmt == "bin":
        model.config.architectures = [type(model).__name__]  # save_pretrained of the model sets it
        model.config.save_pretrained(folder)
        state = {k: v for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        torch.save(state, folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="40KB" if fmt == "sharded" else "50GB")
    if config_json:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_json}))
    return folder


def load_hf(folder: Path, device: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").to(device).eval()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 reordering: atol scaled by the logits' magnitude."""
    atol = rel * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=0)


class PagedDriver:
    """Runs sequences through the model step by step over a shared paged KV cache."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, sequences: Sequence[Sequence[int]],
                 block_size: int, device: str, room_to_generate: int = 0, spare_blocks: int = 3) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        self.tokens = [list(s) for s in sequences]
        self.num_cached = [0] * len(sequences)
        blocks_each = [-(-(len(s) + room_to_generate) // block_size) for s in sequences]
        num_blocks = sum(blocks_each) + spare_blocks
        # Blocks in random order (not monotone, not contiguous): a table must really be followed.
        pool = torch.randperm(num_blocks).tolist()
        self.block_tables = []
        for n in blocks_each:
            self.block_tables.append(pool[:n])
            pool = pool[n:]
        # Random, not zeros: reading a slot that was never written must change the result.
        self.kv_caches = [
            torch.randn(2, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
                        dtype=config.dtype).to(device)
            for _ in range(config.num_hidden_layers)]

    def append(self, seq: int, token: int) -> None:
        """A generated token, to be fed by a later step (its blocks must already be in the table)."""
        self.tokens[seq].append(token)

    @torch.inference_mode()
    def step(self, num_new: Sequence[int]) -> list[torch.Tensor]:
        """Feeds the next num_new[i] tokens of sequence i (0: it sits this step out) and returns
        each fed sequence's logits [num_new[i], vocab] (float32)."""
        fed = [i for i, n in enumerate(num_new) if n > 0]
        input_ids, positions = [], []
        for i in fed:
            start = self.num_cached[i]
            input_ids += self.tokens[i][start:start + num_new[i]]
            positions += range(start, start + num_new[i])
        seq_lens = [self.num_cached[i] + num_new[i] for i in fed]
        metadata = AttentionMetadata.build(seq_lens, [num_new[i] for i in fed],
                                           [self.block_tables[i] for i in fed], self.block_size,
                                           self.device)
        hidden = self.model(torch.tensor(input_ids, device=self.device),
                            torch.tensor(positions, device=self.device), self.kv_caches, metadata)
        logits = self.model.compute_logits(hidden)
        for i in fed:
            self.num_cached[i] += num_new[i]
        return list(logits.split([num_new[i] for i in fed]))
