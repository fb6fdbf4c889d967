"""Helpers of the engine tests: a tiny byte-level BPE tokenizer trained here (no downloads), and HF
transformers' logits and greedy continuations to compare with."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS = 0, 1  # the tiny tokenizer's special tokens come first

# Enough text for a few hundred merges; multi-byte characters, so some tokens are partial characters.
_CORPUS = ("The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks; "
           "continuous batching adds requests as others finish. Ça coûte cinq euros à Zürich. "
           "日本語のテキストも少し。 Numbers: 12345, 67890. def f(x): return x * 2\n\n") * 20


def train_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@torch.inference_mode()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of an HF model over the whole sequence."""
    return hf(torch.tensor([token_ids], device=hf.device)).logits[0].float()


def hf_greedy(hf, prompt: list[int], num_tokens: int,
              adjust: Optional[Callable[[torch.Tensor, list[int]], torch.Tensor]] = None) -> list[int]:
    """HF's greedy continuation, never stopping early; adjust(logits, outputs so far) edits the
    logits of each step first."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        logits = hf_logits(hf, tokens)[-1]
        if adjust is not None:
            logits = adjust(logits, tokens[len(prompt):])
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]
