"""Tiny HF checkpoints, written once per session, and our model and HF's loaded from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.utils import VARIANTS, make_hf_model, save_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint(variant, fmt) -> the folder of that tiny model saved in that format (cached)."""
    folders: dict[tuple[str, str], Path] = {}

    def get(variant: str, fmt: str = "safetensors") -> Path:
        if (variant, fmt) not in folders:
            folder = tmp_path_factory.mktemp(f"{variant}-{fmt}")
            overrides = VARIANTS[variant]
            folders[variant, fmt] = save_checkpoint(make_hf_model(overrides), folder, fmt,
                                                    overrides.get("config_json"))
        return folders[variant, fmt]

    return get
