"""A model's tokenizer: the one of a local HF folder, or the one embedded in a .gguf file."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = Path(path)
    if path.suffix == ".gguf":
        # transformers rebuilds the HF tokenizer (vocab, merges, chat template) from the GGUF metadata.
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                             trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
