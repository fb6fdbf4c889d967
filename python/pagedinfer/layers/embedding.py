"""Token embedding and the LM head that maps hidden states back to vocabulary logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """logits = h E^T. With `tied_embedding` (small models, e.g. SmolLM2, Llama 3.2 1B) E is the token
    embedding's own parameter, so the checkpoint stores it once."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tied_embedding: Optional[VocabEmbedding] = None) -> None:
        super().__init__()
        if tied_embedding is not None:
            self.weight = tied_embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits (the sampler's softmax wants the range)."""
        return F.linear(hidden_states, self.weight).float()
