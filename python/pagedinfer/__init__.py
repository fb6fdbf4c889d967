"""pagedinfer: a small, fast LLM inference engine (PagedAttention, continuous batching, own kernels)."""

__version__ = "0.1.0"
