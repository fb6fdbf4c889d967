"""Paged attention: the per-step metadata and the `Attention` layer that calls the kernels."""

from pagedinfer.attention.backend import Attention
from pagedinfer.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]
