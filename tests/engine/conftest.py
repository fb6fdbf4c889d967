"""A tiny model folder for end-to-end engine tests: a random float32 HF Llama and the tiny tokenizer,
saved as save_pretrained writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tests.engine.utils import BOS, EOS, train_tiny_tokenizer
from tests.models.utils import make_hf_model, save_checkpoint


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """The folder: config.json, generation_config.json (eos = the tokenizer's), weights, tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_tokenizer.save_pretrained(folder)
    model = make_hf_model(dict(vocab_size=len(tiny_tokenizer), bos_token_id=BOS, eos_token_id=EOS,
                               pad_token_id=None))
    return save_checkpoint(model, folder)
