"""The gated activation of Llama's MLP."""

from __future__ import annotations

import torch
from torch import nn

from pagedinfer import _ops


class SiluAndMul(nn.Module):
    """[..., 2d] (gate | up, as the fused gate_up projection lays them out) -> silu(gate) * up, [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.silu_and_mul(x)
