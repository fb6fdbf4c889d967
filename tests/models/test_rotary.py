"""The cos/sin cache against HF's rotary embedding, plain and with Llama 3.1 scaling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedinfer.config import Llama3RopeScaling, ModelConfig
from pagedinfer.layers.rotary import build_cos_sin_cache
from tests.models.utils import TINY, VARIANTS


@pytest.mark.parametrize("variant", ["gqa2", "llama3_rope"])
def test_cos_sin_cache_matches_hf(variant: str) -> None:
    hf_config = LlamaConfig(**{**TINY, **VARIANTS[variant]})
    config = ModelConfig.from_hf_config({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]},
                                        device="cpu")
    max_position = 200
    cache = build_cos_sin_cache(config.head_dim, max_position, config.rope_theta, config.rope_scaling,
                                torch.float32)
    assert cache.shape == (max_position, config.head_dim)
    positions = torch.arange(max_position)[None]
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    half = config.head_dim // 2
    torch.testing.assert_close(cache[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)


def test_llama3_scaling_changes_only_the_long_wavelengths() -> None:
    scaling = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=64)
    plain = build_cos_sin_cache(16, 100, 500000.0, None, torch.float32)
    scaled = build_cos_sin_cache(16, 100, 500000.0, scaling, torch.float32)
    sin_plain, sin_scaled = plain[:, 8:], scaled[:, 8:]
    assert torch.equal(sin_plain[:, 0], sin_scaled[:, 0])  # wavelength 2*pi < 64 / 4: kept
    # The longest wavelength (> 64 / 1) turns `factor` times slower: sin(x / 8) ~ sin(x) / 8 for small x.
    torch.testing.assert_close(sin_scaled[:, 7], sin_plain[:, 7] / 8, atol=1e-6, rtol=1e-3)
