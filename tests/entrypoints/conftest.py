"""A tiny model folder with a chat template, and a real server process serving it on loopback."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.engine.utils import BOS, EOS, train_tiny_tokenizer
from tests.models.utils import make_hf_model, save_checkpoint

if TYPE_CHECKING:
    from tests.entrypoints.utils import ServerProcess

_SERVING_DEPENDENCIES = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "openai", "httpx")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool:
    """These are CPU tests: a `-m gpu` run deselects them anyway, and on a GPU machine without the serve
    and test extras it must not fail importing them. Any other run without the extras fails loudly."""
    missing = [name for name in _SERVING_DEPENDENCIES if importlib.util.find_spec(name) is None]
    return bool(missing) and "gpu" in (config.getoption("markexpr") or "") and collection_path.suffix == ".py"

# Enough of a template to check that the server renders one (roles, contents, the generation prompt).
# It refuses the "tool" role, as many templates refuse what they cannot render.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                 "{% endif %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine tests' tiny random Llama and tokenizer, with a chat template."""
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_tokenizer = train_tiny_tokenizer()
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    tiny_tokenizer.save_pretrained(folder)
    model = make_hf_model(dict(vocab_size=len(tiny_tokenizer), bos_token_id=BOS, eos_token_id=EOS,
                               pad_token_id=None))
    return save_checkpoint(model, folder)


@pytest.fixture(scope="module")
def server(tiny_chat_model: Path) -> Iterator[ServerProcess]:
    """One server for a module's tests: they must leave it idle."""
    from tests.entrypoints.utils import ServerProcess  # needs openai: not at import (see above)
    with ServerProcess(tiny_chat_model) as process:
        yield process
