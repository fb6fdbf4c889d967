"""GGUF checkpoints (llama.cpp's single-file format): the HF config from the metadata, and the
tensors dequantized to float32 under their HF names, ready for the model's `load_weights`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

# general.architecture -> our model class name.
_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Names inside a block: "blk.{i}.{gguf}" is "model.layers.{i}.{hf}".
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_config_from_gguf(path: str | Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(the config.json dict the model would have on the Hub, the eos token ids)."""
    reader = open_gguf(path)
    eos = _metadata(reader, "tokenizer.ggml.eos_token_id")
    return _hf_config(reader), (() if eos is None else (int(eos),))


def iterate_gguf_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 CPU tensor) for every tensor of the file, one at a time."""
    reader = open_gguf(path)
    config = _hf_config(reader)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        weight = _dequantized(tensor)
        projection = name.split(".")[-2]
        if projection in heads:
            weight = _undo_rope_permutation(weight, heads[projection])
        yield name, weight


@lru_cache(maxsize=1)
def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader, parsed once for the config and the weights alike: parsing the metadata
    (tens of thousands of tokenizer strings) takes seconds. Tensors stay memory-mapped, read lazily."""
    return GGUFReader(Path(path))


def _hf_config(reader: GGUFReader) -> dict[str, Any]:
    arch = _metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1's rope scaling as per-frequency factors, not as its parameters.
        raise ValueError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported")

    def get(key: str, default: Any = None) -> Any:
        value = _metadata(reader, f"{arch}.{key}")
        return default if value is None else value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    vocab_size = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        # A tied model has no output matrix: llama.cpp reuses the embedding, as we do.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # Weights come dequantized, so any float dtype fits; half is what GPUs serve in
        # (resolve_dtype makes it float32 on the CPU).
        "torch_dtype": "float16",
    }


def _metadata(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight or bias
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart")


def _dequantized(tensor: ReaderTensor) -> torch.Tensor:
    """float32, in torch's [rows, cols] order (GGUF lists dims innermost first)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
                         f"gguf package cannot dequantize") from None
    shape = tuple(reversed([int(n) for n in tensor.shape]))
    # A copy: the reader's arrays are read-only views of the memory-mapped file.
    return torch.tensor(np.asarray(values, dtype=np.float32)).reshape(shape)


def _undo_rope_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)..., so its converter reorders each head's
    q/k rows from HF's halves order (row i pairs with row i + d/2) to pairs order (row i of the first
    half at 2i, its partner at 2i + 1). Back to halves: [heads, d/2, 2] -> [heads, 2, d/2]."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
