"""How a checkpoint tensor lands in a parameter: shape-checked, cast to the parameter's dtype and device.

A parameter that needs more (a shard of a fused projection) carries its own `weight_loader`
attribute; the model's `load_weights` falls back to `default_weight_loader`.
"""

from __future__ import annotations

import torch


def copy_weight(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """target (a parameter or a slice of one) = loaded, or ValueError if the shapes differ."""
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: the model expects {tuple(target.shape)}, "
                         f"the checkpoint has {tuple(loaded.shape)}")
    target.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    copy_weight(param.data, loaded)
