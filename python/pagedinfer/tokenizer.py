"""A model's tokenizer: the one of a local HF folder, the one embedded in a .gguf file, or, for a folder
with no tokenizer files (a random-weight benchmark model: config.json alone), the synthetic byte-level
tokenizer of the model's vocabulary size."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedinfer.synthetic_tokenizer import synthetic_tokenizer

logger = logging.getLogger(__name__)

# Any of these makes a folder a tokenizer's (a fast tokenizer's, SentencePiece's, or a BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False,
                   vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """vocab_size: the model's, for the synthetic tokenizer of a folder without tokenizer files (None:
    such a folder is an error)."""
    path = Path(path)
    if path.suffix == ".gguf":
        # transformers rebuilds the HF tokenizer (vocab, merges, chat template) from the GGUF metadata.
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                             trust_remote_code=trust_remote_code)
    if path.is_dir() and not has_tokenizer_files(path) and vocab_size is not None:
        # Without this, a config-only benchmark model could not take text: say so, in case files were
        # forgotten rather than never there.
        logger.warning("%s has no tokenizer files (%s): using a synthetic byte-level tokenizer of the model's "
                       "%d ids (text is bytes; other ids decode to placeholders). Pass tokenizer= to use a "
                       "real one, or skip_tokenizer_init=True for token ids only.",
                       path, ", ".join(TOKENIZER_FILES), vocab_size)
        return synthetic_tokenizer(vocab_size)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
