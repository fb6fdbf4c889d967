"""Linear projections, and the fused ones that compute several projections of one input in one GEMM."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedinfer.layers.weight_loader import copy_weight


class Linear(nn.Module):
    """y = x W^T (+ b). W is [output_size, input_size], as checkpoints store it."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnLinear(Linear):
    """Projections of the same input stacked along the output dim (q|k|v, gate|up): one GEMM reads x
    once. The checkpoint stores them apart; shard i is loaded into rows
    [sum(output_sizes[:i]), sum(output_sizes[:i + 1])) of the weight and bias."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = tuple(output_sizes)
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        offset = sum(self.output_sizes[:shard])
        copy_weight(param.data.narrow(0, offset, self.output_sizes[shard]), loaded)
