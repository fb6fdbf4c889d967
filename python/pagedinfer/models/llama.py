"""Llama (2, 3, 3.1, 3.2; SmolLM2 and other Llama-architecture models) over the paged KV cache, and
the families with the same decoder that differ only in what ModelConfig describes: Mistral (a sliding
window) and Qwen2 (biased q/k/v, a sliding window on some layers).

Module and parameter names follow HF's, so that checkpoint names map onto them directly, except
for the fused projections: q|k|v become `qkv_proj` and gate|up become `gate_up_proj` (one GEMM each).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from pagedinfer.attention import Attention, AttentionMetadata
from pagedinfer.config import ModelConfig
from pagedinfer.layers.activation import SiluAndMul
from pagedinfer.layers.embedding import LMHead, VocabEmbedding
from pagedinfer.layers.linear import Linear, MergedColumnLinear
from pagedinfer.layers.norm import RMSNorm
from pagedinfer.layers.rotary import RotaryEmbedding
from pagedinfer.layers.weight_loader import default_weight_loader

# Checkpoint projections stored here as shards of one fused parameter: (fused, checkpoint's, shard).
_FUSED_SHARDS = (
    ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, sliding_window: int) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.q_size = config.num_attention_heads * head_dim
        self.kv_size = config.num_key_value_heads * head_dim
        self.qkv_proj = MergedColumnLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                           bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.rotary_emb = RotaryEmbedding(head_dim, head_dim, config.max_model_len, config.rope_theta,
                                          config.rope_scaling, is_neox=True)
        self.attn = Attention(config.num_attention_heads, head_dim, config.num_key_value_heads,
                              scale=head_dim ** -0.5, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        # Views into qkv: rotary and the cache write take them as they are, no copies.
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(config.hidden_size, [config.intermediate_size] * 2,
                                               bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, config.layer_sliding_windows[layer_index])
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor], kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it). The add of the two is left
        to the next norm, which fuses it."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_embedding=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [num_tokens] (int64) -> hidden states [num_tokens, hidden_size].
        kv_caches: one [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] (the rows to sample from) -> [n, vocab_size] float32 logits."""
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the parameters. A tensor that has no parameter, a
        shape that differs, or a parameter the checkpoint lacks is an error naming the tensor."""
        params = dict(self.named_parameters())  # a tied lm_head is listed once, as the embedding
        expected = {name for param_name in params for name in _checkpoint_names(param_name)}
        loaded = set()
        for name, tensor in weights:
            if _ignored(name, self.config):
                continue
            param_name, shard = _parameter_of(name)
            if param_name not in params:
                raise ValueError(f"the checkpoint has tensor {name!r}, which the model does not use")
            param = params[param_name]
            try:
                if shard is None:
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard)
            except ValueError as error:
                raise ValueError(f"tensor {name!r}: {error}") from None
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s): {', '.join(missing)}")


def _parameter_of(checkpoint_name: str) -> tuple[str, Optional[int]]:
    """The parameter a checkpoint tensor goes to, and its shard there (None: the whole parameter)."""
    for fused, separate, shard in _FUSED_SHARDS:
        if f".{separate}." in checkpoint_name:
            return checkpoint_name.replace(f".{separate}.", f".{fused}."), shard
    return checkpoint_name, None


def _checkpoint_names(param_name: str) -> list[str]:
    """The checkpoint tensors that fill a parameter (several for a fused one)."""
    separate_names = [param_name.replace(f".{fused}.", f".{separate}.")
                      for fused, separate, _ in _FUSED_SHARDS if f".{fused}." in param_name]
    return separate_names or [param_name]


def _ignored(checkpoint_name: str, config: ModelConfig) -> bool:
    # Old checkpoints saved RoPE's inverse frequencies (we derive them); some tied ones save the
    # lm_head copy of the embedding anyway.
    return ("rotary_emb.inv_freq" in checkpoint_name
            or (config.tie_word_embeddings and checkpoint_name == "lm_head.weight"))
