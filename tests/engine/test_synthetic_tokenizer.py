"""The synthetic byte-level tokenizer, and models that come without a tokenizer: a tiny random Llama
saved as config.json and weights only, and a config.json alone with random ("dummy") weights, through
generate, chat and the server; skip_tokenizer_init on such a folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers

from pagedinfer import LLM, SamplingParams
from pagedinfer.synthetic_tokenizer import (CHAT_TEMPLATE, FIRST_BYTE_ID, MIN_VOCAB_SIZE, byte_symbols,
                                            synthetic_tokenizer)
from pagedinfer.tokenizer import has_tokenizer_files
from tests.engine.utils import hf_greedy
from tests.models.utils import load_hf

TEXTS = ["The quick brown fox", "Ça coûte 5 € à Zürich", "日本語のテキスト 🦊",
         "tabs\tand\nnewlines \x00 nul"]


# ---- the tokenizer ---------------------------------------------------------------------------------

def test_byte_symbols_are_byte_levels_alphabet() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "\u0120"  # GPT-2's "Ġ"


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 320, 128256])
def test_exactly_the_models_ids(vocab_size: int) -> None:
    tokenizer = synthetic_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))) == \
        list(range(vocab_size))


@pytest.mark.parametrize("text", TEXTS[:4])
def test_text_is_its_bytes_and_round_trips(text: str) -> None:
    tokenizer = synthetic_tokenizer(320)
    ids = tokenizer.encode(text)
    assert ids == [0] + [FIRST_BYTE_ID + b for b in text.encode()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<|bos|>" + text


def test_special_tokens_written_in_text_are_those_tokens() -> None:
    """As with HF tokenizers: a chat template writes EOS as text."""
    tokenizer = synthetic_tokenizer(320)
    ids = tokenizer.encode("a<|eos|>b", add_special_tokens=False)
    assert ids == [FIRST_BYTE_ID + ord("a"), 1, FIRST_BYTE_ID + ord("b")]
    assert tokenizer.decode(ids) == "a<|eos|>b" and tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_other_ids_decode_to_their_placeholders() -> None:
    tokenizer = synthetic_tokenizer(1000)
    assert tokenizer.decode([MIN_VOCAB_SIZE, 999]) == f"<|{MIN_VOCAB_SIZE}|><|999|>"
    assert tokenizer.decode([FIRST_BYTE_ID + ord("a"), 1, 700], skip_special_tokens=True) == "a<|700|>"
    # Encoding never produces them: the placeholder's text is its bytes.
    assert tokenizer.encode("<|700|>", add_special_tokens=False) == [FIRST_BYTE_ID + b for b in b"<|700|>"]


def test_chat_template() -> None:
    tokenizer = synthetic_tokenizer(320)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi!<|eos|>\n<|assistant|>\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(0) == 1 and ids.count(1) == 2 and ids[0] == 0


def test_too_small_a_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size 258 is too small"):
        synthetic_tokenizer(258)


# ---- models without a tokenizer --------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_only_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (vocabulary 320) without its tokenizer files: config.json and weights."""
    folder = tmp_path_factory.mktemp("weights-only")
    for file in tiny_model.iterdir():
        if file.name in ("config.json", "generation_config.json") or file.suffix == ".safetensors":
            shutil.copy(file, folder)
    assert not has_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A benchmark model as they come: config.json alone (a small Llama with Llama 3's vocabulary)."""
    folder = tmp_path_factory.mktemp("config-only")
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=128000, eos_token_id=128001, dtype="float32")))
    return folder


def _llm(folder: Path, **overrides) -> LLM:
    options = dict(device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=128, max_num_seqs=4,
                   max_model_len=128)
    return LLM(model=str(folder), **(options | overrides))


def test_weights_only_model_generates_with_the_synthetic_tokenizer(
        weights_only_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pagedinfer.tokenizer")
    llm = _llm(weights_only_model)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no tokenizer files" in warning and "synthetic byte-level tokenizer" in warning
    tokenizer = llm.get_tokenizer()
    assert len(tokenizer) == 320
    hf = load_hf(weights_only_model, "cpu")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(TEXTS[:3], params, use_tqdm=False)
    for text, output in zip(TEXTS, outputs):
        assert output.prompt_token_ids == [0] + [FIRST_BYTE_ID + b for b in text.encode()]
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(hf, output.prompt_token_ids, 8)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    (chat,) = llm.chat([{"role": "user", "content": "Hi!"}], params, use_tqdm=False)
    assert chat.prompt == "<|bos|><|user|>\nHi!<|eos|>\n<|assistant|>\n"
    assert chat.prompt_token_ids == tokenizer.encode(chat.prompt, add_special_tokens=False)
    assert chat.outputs[0].token_ids == hf_greedy(hf, chat.prompt_token_ids, 8)


def test_a_tokenizer_folder_is_still_used(tiny_model: Path, tiny_tokenizer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pagedinfer.tokenizer")
    llm = _llm(tiny_model)
    assert not caplog.records
    assert llm.get_tokenizer().encode("The quick") == tiny_tokenizer.encode("The quick")
    assert has_tokenizer_files(tiny_model)


def test_config_only_dummy_model_generates_and_chats(config_only_model: Path) -> None:
    llm = _llm(config_only_model, load_format="dummy")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    (output,) = llm.generate("Hello, wörld", params, use_tqdm=False)
    assert output.prompt_token_ids[0] == 0 and len(output.prompt_token_ids) == 1 + len("Hello, wörld".encode())
    completion = output.outputs[0]
    assert len(completion.token_ids) == 6 and all(0 <= t < 128256 for t in completion.token_ids)
    assert completion.text == llm.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)
    (chat,) = llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False)
    assert chat.prompt.endswith("<|assistant|>\n") and len(chat.outputs[0].token_ids) == 6
    # The model's EOS ids (config.json) stop it, and so does the tokenizer's.
    assert set(llm.llm_engine.eos_token_ids) == {128001, 1}


def test_skip_tokenizer_init_on_a_config_only_model(config_only_model: Path) -> None:
    llm = _llm(config_only_model, load_format="dummy", skip_tokenizer_init=True)
    prompt = torch.randint(0, 128256, (9,)).tolist()
    (output,) = llm.generate({"prompt_token_ids": prompt},
                             SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1),
                             use_tqdm=False)
    completion = output.outputs[0]
    assert output.prompt_token_ids == prompt and output.prompt is None
    assert len(completion.token_ids) == 5 and completion.text == ""
    assert all(logprob.decoded_token is None for step in completion.logprobs for logprob in step.values())
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("text needs a tokenizer", use_tqdm=False)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_server_serves_a_config_only_dummy_model(config_only_model: Path) -> None:
    pytest.importorskip("fastapi")
    from tests.entrypoints.utils import ServerProcess

    server = ServerProcess(config_only_model, "--load-format", "dummy", cli=True)
    try:
        client = server.client()
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens <= 4 and isinstance(chat.choices[0].message.content, str)
        completion = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
        assert completion.usage.prompt_tokens == 4  # BOS and three bytes
    finally:
        server.stop()
