"""Where a model's files are: a local HF folder or .gguf file as given, else a model id (`org/name`)
already in the local Hugging Face cache. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path


def resolve_model_path(model: str, parameter: str = "model") -> str:
    if Path(model).exists():
        return str(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        raise ValueError(
            f"{parameter}={model!r} is neither a local HF folder or .gguf file nor a model in the local "
            f"Hugging Face cache; pagedinfer does not download models: fetch it first (for example "
            f"`huggingface-cli download {model}`) or pass its folder") from None
