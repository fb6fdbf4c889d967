"""Architecture name (config.json's "architectures"[0]) -> model class."""

from __future__ import annotations

from torch import nn

from pagedinfer.models.llama import LlamaForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Llama's decoder: their differences (q/k/v bias, sliding windows) are in ModelConfig.
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODEL_CLASSES:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(supported_architectures())}")
    return _MODEL_CLASSES[architecture]
