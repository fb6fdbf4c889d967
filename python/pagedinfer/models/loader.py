"""Build a model on its device and fill its weights: safetensors (single or sharded), PyTorch .bin,
GGUF, or random ("dummy", for benchmarks without a checkpoint)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagedinfer.config import ModelConfig
from pagedinfer.models.registry import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")


def load_model(config: ModelConfig, device: torch.device | str, load_format: str = "auto",
               seed: int = 0) -> nn.Module:
    """The model of `config` on `device` in `config.dtype`, its weights loaded, in eval mode."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: use one of {LOAD_FORMATS}")
    # Parameters are created where and as they will live: no float32 copy on the CPU first.
    with _default_dtype(config.dtype), torch.device(device):
        model = get_model_class(config.architecture)(config)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        model.load_weights(iterate_weights(config.model, load_format))
    return model.eval()


def iterate_weights(model: str | Path, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) pairs of a local checkpoint, one tensor in memory at a time."""
    path = Path(model)
    if load_format == "gguf" or (load_format == "auto" and path.suffix == ".gguf"):
        from pagedinfer.models.gguf_loader import iterate_gguf_weights
        yield from iterate_gguf_weights(path)
        return
    for file in checkpoint_files(path, load_format):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            # weights_only: a .bin is a pickle, and must not run code. mmap: read tensors lazily.
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


def checkpoint_files(folder: Path, load_format: str = "auto") -> list[Path]:
    """The weight files of an HF folder: the shards its index lists, else every file of the format.
    safetensors is preferred when both are present ("auto")."""
    candidates = {"safetensors": ("model.safetensors.index.json", "*.safetensors"),
                  "pt": ("pytorch_model.bin.index.json", "pytorch_model*.bin")}
    formats = list(candidates) if load_format == "auto" else [load_format]
    for fmt in formats:
        index_name, pattern = candidates[fmt]
        index = folder / index_name
        if index.exists():
            return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no {' or '.join(formats)} weights in {folder}")


def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Matrices drawn from N(0, std) on their device, the same for the same seed; norms keep their
    ones and biases their zeros. Activations then have realistic magnitudes (a benchmark's kernels see
    ordinary numbers, not infs or denormals)."""
    generator = None
    for param in model.parameters():
        if param.dim() < 2:
            continue
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        param.data.normal_(0.0, std, generator=generator)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
