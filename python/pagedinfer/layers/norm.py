"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagedinfer import _ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: rms_norm(x). With one: (rms_norm(x + residual), x + residual), computed
        in place in x and residual (one pass over memory instead of three)."""
        if residual is None:
            return _ops.rms_norm(x, self.weight, self.eps)
        _ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
